// Role assignments by role definition id, least privilege, each at the narrowest scope that works. Every Service
// Bus role is scoped to one queue (a queue-scoped role covers its dead-letter sub-queue), none to the namespace.
//   API (Function App): Azure Service Bus Data Owner on each of its three queues, and nothing more on Service Bus.
//     GET /api/stats reads queue runtime properties (ServiceBusAdministrationClient.get_queue_runtime_properties:
//     the ATOM "get the queue description" operation), which needs the Manage claim; with Entra ID only Data Owner
//     carries it (Data Sender = Send, Data Receiver = Listen), and a queue-scoped Data Owner is enough for that
//     queue's description (docs/deploy.md cites the pages). Data Owner includes send and receive, so the API holds
//     no separate Sender/Receiver assignment on these queues:
//       jobs, jobs-high: submit and the reconciler send (resend, expire, redrive); the reconciler receives from the
//         dead-letter sub-queues; stats reads their runtime properties;
//       job-events: the API sends (webhook retries are scheduled messages); the Service Bus trigger that delivers
//         webhooks receives; the trigger's target-based scaler reads the queue's runtime properties too (without
//         Manage it logs "does not have 'Manage Claim'" and reports target-based scaling as unsupported).
//     Storage Blob Data Owner on the account: the account is also the Functions host storage (AzureWebJobsStorage:
//     keys, the timer's schedule monitor and singleton lock, host id; the host creates those containers itself) and
//     holds the Flex Consumption deployment package. The Functions docs name Blob Data Owner as the host storage role
//     ("Connecting to host storage with an identity", functions-reference; docs/deploy.md quotes it); it includes
//     everything the API does with images and results (write images, read results, user delegation keys), so the API
//     holds no separate Blob Data Contributor. Storage Table Data Contributor on the account: the host's diagnostic
//     events (AzureWebJobsStorage__tableServiceUri), the docs' "host only, with support for diagnostic events" row;
//     the host's diagnostic tables are the only tables in the account.
//   Workers: Service Bus Data Receiver and Data Sender on jobs and on jobs-high (they receive one message at a time
//     from either; a transient error or a drain releases the attempt and schedules the job's next message, in the
//     queue it came from, after its backoff); Data Sender on job-events (webhook events of the jobs they finish);
//     Blob Data Reader on images; Blob Data Contributor on results; AcrPull on the registry. Storage Blob Delegator
//     on the account (its only action is generateUserDelegationKey, an account-level operation that no
//     container-scoped role grants): an input by reference is analysed through GDAL's /vsicurl/ with a short-lived
//     read SAS the worker signs with a user delegation key; the SAS can do no more than the worker's own roles on
//     that blob (Blob Data Reader on images), so it reads images only.
//   Both: Monitoring Metrics Publisher on Application Insights (telemetry with Entra auth; local auth is off).
// PostgreSQL access is not an Azure role: both identities are Entra principals of the server (modules/postgres.bicep).

@description('Principal (object) id of the Function App identity.')
param apiPrincipalId string

@description('Principal (object) id of the GPU worker identity.')
param workerPrincipalId string

@description('Name of the Service Bus namespace.')
param serviceBusNamespaceName string

@description('Name of the normal-priority jobs queue.')
param queueName string

@description('Name of the high-priority jobs queue.')
param highPriorityQueueName string

@description('Name of the webhook delivery events queue.')
param eventsQueueName string

@description('Name of the storage account.')
param storageAccountName string

@description('Container of uploaded images.')
param imagesContainerName string

@description('Container of results.')
param resultsContainerName string

@description('Name of the container registry.')
param registryName string

@description('Name of the Application Insights component.')
param appInsightsName string

// Built-in role definition ids (the same in every tenant).
var roles = {
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39' // Azure Service Bus Data Sender
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0' // Azure Service Bus Data Receiver
  serviceBusDataOwner: '090c5cfd-751d-490a-894a-3ce6f1109419' // Azure Service Bus Data Owner
  blobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // Storage Blob Data Owner
  blobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe' // Storage Blob Data Contributor
  blobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1' // Storage Blob Data Reader
  blobDelegator: 'db58b8e5-c6ad-4a2a-8342-4190687cbf4a' // Storage Blob Delegator
  tableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // Storage Table Data Contributor
  acrPull: '7f951dda-4ed3-4680-a7ca-43fe172d538d' // AcrPull
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb' // Monitoring Metrics Publisher
}

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' existing = {
  name: serviceBusNamespaceName
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' existing = {
  parent: namespace
  name: queueName
}

resource highPriorityQueue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' existing = {
  parent: namespace
  name: highPriorityQueueName
}

resource eventsQueue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' existing = {
  parent: namespace
  name: eventsQueueName
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource imagesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: imagesContainerName
}

resource resultsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: resultsContainerName
}

resource registry 'Microsoft.ContainerRegistry/registries@2025-04-01' existing = {
  name: registryName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource apiJobsOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, apiPrincipalId, roles.serviceBusDataOwner)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataOwner)
    principalId: apiPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource apiHighPriorityOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(highPriorityQueue.id, apiPrincipalId, roles.serviceBusDataOwner)
  scope: highPriorityQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataOwner)
    principalId: apiPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource apiEventsOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(eventsQueue.id, apiPrincipalId, roles.serviceBusDataOwner)
  scope: eventsQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataOwner)
    principalId: apiPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource apiBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, apiPrincipalId, roles.blobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataOwner)
    principalId: apiPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource apiTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, apiPrincipalId, roles.tableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.tableDataContributor)
    principalId: apiPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource apiMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, apiPrincipalId, roles.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: apiPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, workerPrincipalId, roles.serviceBusDataSender)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, workerPrincipalId, roles.serviceBusDataReceiver)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataReceiver)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerHighPrioritySender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(highPriorityQueue.id, workerPrincipalId, roles.serviceBusDataSender)
  scope: highPriorityQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerHighPriorityReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(highPriorityQueue.id, workerPrincipalId, roles.serviceBusDataReceiver)
  scope: highPriorityQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataReceiver)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerEventsSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(eventsQueue.id, workerPrincipalId, roles.serviceBusDataSender)
  scope: eventsQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerImagesReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(imagesContainer.id, workerPrincipalId, roles.blobDataReader)
  scope: imagesContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataReader)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerBlobDelegator 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, workerPrincipalId, roles.blobDelegator)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDelegator)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerResultsContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resultsContainer.id, workerPrincipalId, roles.blobDataContributor)
  scope: resultsContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataContributor)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerAcrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, workerPrincipalId, roles.acrPull)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.acrPull)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource workerMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, workerPrincipalId, roles.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: workerPrincipalId
    principalType: 'ServicePrincipal'
  }
}
