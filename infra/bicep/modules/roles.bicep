// Role assignments by role definition id, least privilege, each at the narrowest scope that works:
//   API (Function App): on the queue, Service Bus Data Sender (submit sends a job's message; the reconciler sends
//     it again: resend, expire, redrive) and Data Receiver (the reconciler receives from the queue's dead-letter
//     sub-queue, <queue>/$deadletterqueue, and completes each letter; a queue-scoped role covers its sub-queue);
//     Blob Data Contributor on the account (it writes images, reads results, and the Functions host keeps its own
//     state there: keys, the timer's schedule monitor and singleton lock, the deployment package).
//   Workers: Service Bus Data Receiver on the queue (one message at a time), and Sender on the queue too (a
//     transient error or a drain releases the attempt and schedules the job's next message after its backoff);
//     Blob Data Reader on images; Blob Data Contributor on results; AcrPull on the registry.
//   Both: Monitoring Metrics Publisher on Application Insights (telemetry with Entra auth; local auth is off).
// PostgreSQL access is not an Azure role: both identities are Entra principals of the server (modules/postgres.bicep).

@description('Principal (object) id of the Function App identity.')
param apiPrincipalId string

@description('Principal (object) id of the GPU worker identity.')
param workerPrincipalId string

@description('Name of the Service Bus namespace.')
param serviceBusNamespaceName string

@description('Name of the jobs queue.')
param queueName string

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
  blobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe' // Storage Blob Data Contributor
  blobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1' // Storage Blob Data Reader
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

resource apiSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, apiPrincipalId, roles.serviceBusDataSender)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: apiPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource apiReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, apiPrincipalId, roles.serviceBusDataReceiver)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataReceiver)
    principalId: apiPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource apiBlobContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, apiPrincipalId, roles.blobDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataContributor)
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

resource workerImagesReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(imagesContainer.id, workerPrincipalId, roles.blobDataReader)
  scope: imagesContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataReader)
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
