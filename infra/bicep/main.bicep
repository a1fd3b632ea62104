// Crop AI on Azure: the whole asynchronous inference pipeline, keyless.
//
//   HTTP client -> Function App (Flex Consumption, Python 3.11) -> Blob Storage (images) + PostgreSQL (job row)
//               -> Service Bus queue jobs or jobs-high -> GPU VM Scale Set (Spot, autoscaled on both backlogs)
//               -> PostgreSQL (result) -> queue job-events -> Function App (webhook delivery) ;
//               Application Insights sees every hop.
//
// Deploy (docs/deploy.md):  azd up  (azure.yaml: this template with main.bicepparam, the Function App package, the
// worker image built in ACR), or the infrastructure alone with
//   az deployment sub create --location <region> --parameters infra/bicep/main.bicepparam
// The outputs are azd environment values: AZURE_RESOURCE_GROUP (where azd finds the tagged resources),
// AZURE_CONTAINER_REGISTRY_NAME and WORKER_IMAGE (read by the image hook, infra/hooks/build-worker-image.*).
// Every resource authenticates with Microsoft Entra ID through two user-assigned identities; shared keys, SAS,
// registry admin users and database passwords are all disabled.
targetScope = 'subscription'

// ---------------------------------------------------------------------------------------------------- general
@description('Short environment name (dev, test, prod); part of the resource group and resource names.')
@minLength(2)
@maxLength(12)
param environmentName string

@description('Azure region of every resource; it must offer Flex Consumption and the GPU VM size.')
param location string

@description('Name of the resource group to create.')
param resourceGroupName string = 'rg-cropai-${environmentName}'

@description('Tags applied to every resource.')
param tags object = {}

// ---------------------------------------------------------------------------------------------------- queue
// Defaults must equal local/servicebus.config.json (tests/infra/test_settings_alignment.py holds the expected values).
// The app reads none of them: attempts are bounded by jobMaxAttempts (JOB_MAX_ATTEMPTS), not by the delivery count.
// The queue* properties apply to both jobs queues, jobs and jobs-high; the job-events queue has its own defaults in
// modules/servicebus.bicep (queue names other than jobs are not parameters: JOBS_HIGH_QUEUE_NAME and
// JOB_EVENTS_QUEUE_NAME follow the module's outputs).
@description('Service Bus tier: Standard or Premium.')
@allowed([
  'Standard'
  'Premium'
])
param serviceBusSku string = 'Standard'

@description('Premium messaging units (1, 2, 4, 8, 16); ignored for Standard.')
@allowed([
  1
  2
  4
  8
  16
])
param serviceBusPremiumCapacity int = 1

@description('Name of the normal-priority jobs queue (JOBS_QUEUE_NAME).')
param queueName string = 'jobs'

@description('Peek-lock duration of the jobs queues (ISO 8601).')
param queueLockDuration string = 'PT1M'

@description('Deliveries before a message is dead-lettered (MaxDeliveryCountExceeded; the reconciler re-drives a queued job).')
@minValue(1)
param queueMaxDeliveryCount int = 5

@description('Dead-letter expired messages (TTLExpiredException) instead of dropping them.')
param queueDeadLetteringOnMessageExpiration bool = true

@description('Duplicate detection on MessageId (= job id).')
param queueRequiresDuplicateDetection bool = true

@description('Duplicate detection history window (ISO 8601).')
param queueDuplicateDetectionHistoryTimeWindow string = 'PT10M'

@description('Message time to live in the jobs queues (ISO 8601).')
param queueDefaultMessageTimeToLive string = 'P1D'

// ---------------------------------------------------------------------------------------------------- storage
@description('Storage redundancy SKU.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSku string = 'Standard_ZRS'

@description('Days after which input images are deleted (at least 2: a direct upload may be submitted up to a day after it was written).')
@minValue(2)
param inputRetentionDays int = 7

// ---------------------------------------------------------------------------------------------------- database
@description('PostgreSQL major version.')
@allowed([
  '14'
  '15'
  '16'
])
param postgresVersion string = '16'

@description('PostgreSQL compute SKU name.')
param postgresSkuName string = 'Standard_B1ms'

@description('PostgreSQL compute tier (Burstable, GeneralPurpose, MemoryOptimized).')
@allowed([
  'Burstable'
  'GeneralPurpose'
  'MemoryOptimized'
])
param postgresSkuTier string = 'Burstable'

@description('PostgreSQL storage in GiB.')
param postgresStorageSizeGB int = 32

@description('PostgreSQL high availability: Disabled, SameZone or ZoneRedundant (not on Burstable).')
@allowed([
  'Disabled'
  'SameZone'
  'ZoneRedundant'
])
param postgresHighAvailability string = 'Disabled'

@description('PostgreSQL geo-redundant backups: Enabled or Disabled (fixed at creation).')
@allowed([
  'Enabled'
  'Disabled'
])
param postgresGeoRedundantBackup string = 'Disabled'

@description('PostgreSQL public network access: Enabled (firewall rules) or Disabled.')
@allowed([
  'Enabled'
  'Disabled'
])
param postgresPublicNetworkAccess string = 'Enabled'

@description('Admit connections from Azure services to PostgreSQL (needed by Flex Consumption without VNet integration).')
param postgresAllowAzureServices bool = true

@description('Extra PostgreSQL firewall rules: [{ name, startIpAddress, endIpAddress }].')
param postgresAllowedIpRanges array = []

@description('Name of the application database (POSTGRES_DATABASE).')
param databaseName string = 'cropai'

@description('Object id of an extra Entra administrator of PostgreSQL (a person or group who runs migrations by hand); empty for none.')
param postgresAdminObjectId string = ''

@description('Display name (UPN or group name) of that extra administrator.')
param postgresAdminName string = ''

@description('Type of that extra administrator: User or Group.')
@allowed([
  'User'
  'Group'
])
param postgresAdminType string = 'Group'

// ---------------------------------------------------------------------------------------------------- API
@description('Most Flex Consumption instances of the API.')
param functionMaximumInstanceCount int = 40

@description('Memory per API instance in MB (512, 2048, 4096).')
@allowed([
  512
  2048
  4096
])
param functionInstanceMemoryMB int = 2048

// Defaults equal shared/settings.py's (tests/infra checks it). WEBHOOK_ALLOW_PRIVATE is deliberately no parameter:
// it is false in Azure (modules/functionapp.bicep), true only on the local stack.
@description('Queued jobs above which submit answers 429 (MAX_BACKLOG).')
@minValue(1)
param maxBacklog int = 10000

@description('Hosts an image_url may name outside the storage account, comma-separated, *.suffix allowed (IMAGE_URL_ALLOWED_HOSTS); empty: none.')
param imageUrlAllowedHosts string = ''

@description('Seconds one webhook delivery may take (WEBHOOK_TIMEOUT).')
@minValue(1)
param webhookTimeoutSeconds int = 10

@description('Delivery attempts of one webhook event (WEBHOOK_MAX_ATTEMPTS).')
@minValue(1)
param webhookMaxAttempts int = 8

@description('Delay before the second webhook attempt, doubled per attempt (WEBHOOK_BACKOFF, ISO 8601).')
param webhookBackoff string = 'PT5S'

@description('Longest delay between two webhook attempts (WEBHOOK_BACKOFF_MAX, ISO 8601).')
param webhookBackoffMax string = 'PT10M'

// ---------------------------------------------------------------------------------------------------- workers
@description('Container registry SKU.')
@allowed([
  'Basic'
  'Standard'
  'Premium'
])
param registrySku string = 'Standard'

@description('Worker image repository:tag in the registry; azd\'s predeploy hook builds Dockerfile.gpu into it (az acr build).')
param workerImage string = 'crop-ai-worker:latest'

@description('NC-series GPU VM size of the workers.')
param gpuVmSku string = 'Standard_NC4as_T4_v3'

@description('Run the workers on Spot VMs.')
param gpuUseSpot bool = true

@description('Spot eviction policy: Delete or Deallocate.')
@allowed([
  'Delete'
  'Deallocate'
])
param gpuSpotEvictionPolicy string = 'Delete'

@description('Spot maximum hourly price in USD; -1 = up to the pay-as-you-go price.')
param gpuSpotMaxPrice int = -1

@description('Administrator user of the worker VMs (SSH key only).')
param gpuAdminUsername string = 'azureuser'

@description('SSH public key of that administrator.')
param gpuSshPublicKey string

@description('Seconds a worker has to drain after SIGTERM or a Preempt notice (WORKER_SHUTDOWN_GRACE).')
param workerShutdownGraceSeconds int = 25

@description('Fewest worker VMs (0 = scale to zero when idle).')
param workerMinInstances int = 0

@description('Most worker VMs.')
param workerMaxInstances int = 4

@description('High-priority jobs a worker takes in a row before it takes one normal job if one waits (WORKER_HIGH_PRIORITY_BURST).')
@minValue(1)
param workerHighPriorityBurst int = 4

@description('Scale out while the normal-priority queue\'s average active message count is above this.')
param scaleOutThreshold int = 0

@description('Scale in while the normal-priority queue\'s average active message count is at most this (and the high-priority queue\'s at most its own).')
param scaleInThreshold int = 0

@description('Scale out while the high-priority queue\'s average active message count is above this.')
param highPriorityScaleOutThreshold int = 0

@description('Scale in while the high-priority queue\'s average active message count is at most this (and the normal-priority queue\'s at most its own).')
param highPriorityScaleInThreshold int = 0

@description('Cool-down after a scale-out (ISO 8601).')
param scaleOutCooldown string = 'PT10M'

@description('Cool-down after a scale-in (ISO 8601).')
param scaleInCooldown string = 'PT10M'

// ---------------------------------------------------------------------------------------------------- job lifecycle
// docs/lifecycle.md. Defaults equal shared/settings.py's (tests/infra checks it). The worker renews a message's
// lock for JOB_TIMEOUT + WORKER_SHUTDOWN_GRACE + JOB_LEASE (computed in code), so there is no lock setting here.
@description('Attempts (claims) a job gets before it fails retries_exhausted (JOB_MAX_ATTEMPTS); the worker and the reconciler both read it.')
@minValue(1)
param jobMaxAttempts int = 5

@description('Lease of a running attempt, renewed every third of it by the worker (JOB_LEASE, ISO 8601); shorter than jobTimeout.')
param jobLease string = 'PT2M'

@description('Time limit of one attempt, after which the worker fails it timed_out (JOB_TIMEOUT, ISO 8601).')
param jobTimeout string = 'PT1H'

@description('Delay before the second attempt after a transient error, doubled per attempt (RETRY_BACKOFF, ISO 8601).')
param retryBackoff string = 'PT10S'

@description('Longest delay between two attempts (RETRY_BACKOFF_MAX, ISO 8601).')
param retryBackoffMax string = 'PT5M'

@description('NCRONTAB schedule of the reconciler Function (RECONCILE_SCHEDULE): {second} {minute} {hour} {day} {month} {day-of-week}, UTC.')
param reconcileSchedule string = '0 */1 * * * *'

@description('How long a queued job\'s send may stay unconfirmed before the reconciler sends it again (RECONCILE_RESEND_AFTER, ISO 8601).')
param reconcileResendAfter string = 'PT2M'

@description('Jobs (and dead letters) the reconciler handles per step and run (RECONCILE_BATCH).')
@minValue(1)
param reconcileBatch int = 100

// ---------------------------------------------------------------------------------------------------- alerts
@description('Resource id of an existing action group for the alerts; empty to use alertEmail.')
param actionGroupId string = ''

@description('E-mail address for a new action group when actionGroupId is empty; empty for none.')
param alertEmail string = ''

@description('Active messages in either jobs queue above which the backlog alert fires.')
param backlogAlertThreshold int = 100

@description('Worker exceptions per 15 minutes above which the worker-errors alert fires.')
param workerErrorAlertThreshold int = 0

// ---------------------------------------------------------------------------------------------------- names
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var allTags = union(tags, {
  'azd-env-name': environmentName
  application: 'crop-ai'
})
// Telemetry: OTEL_SERVICE_NAME is the service namespace, the process adds its role (shared/telemetry.py), so
// Application Insights shows cloud_RoleName 'crop-ai.api' and 'crop-ai.gpu-worker'.
var otelServiceName = 'crop-ai'
var workerRoleName = '${otelServiceName}.gpu-worker'
var names = {
  apiIdentity: 'id-api-${resourceToken}'
  workerIdentity: 'id-worker-${resourceToken}'
  workspace: 'log-${resourceToken}'
  appInsights: 'appi-${resourceToken}'
  storage: 'st${resourceToken}'
  serviceBus: 'sb-${resourceToken}'
  postgres: 'psql-${resourceToken}'
  registry: 'cr${resourceToken}'
  plan: 'plan-${resourceToken}'
  functionApp: 'func-${resourceToken}'
  vnet: 'vnet-${resourceToken}'
  vmss: 'vmss-${resourceToken}'
  alerts: 'alert-${resourceToken}'
}

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: resourceGroupName
  location: location
  tags: allTags
}

module identities 'modules/identities.bicep' = {
  name: 'identities'
  scope: rg
  params: {
    location: location
    tags: allTags
    apiIdentityName: names.apiIdentity
    workerIdentityName: names.workerIdentity
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    location: location
    tags: allTags
    workspaceName: names.workspace
    appInsightsName: names.appInsights
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    location: location
    tags: allTags
    storageAccountName: names.storage
    skuName: storageSku
    inputRetentionDays: inputRetentionDays
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  scope: rg
  params: {
    location: location
    tags: allTags
    namespaceName: names.serviceBus
    skuName: serviceBusSku
    premiumCapacity: serviceBusPremiumCapacity
    queueName: queueName
    lockDuration: queueLockDuration
    maxDeliveryCount: queueMaxDeliveryCount
    deadLetteringOnMessageExpiration: queueDeadLetteringOnMessageExpiration
    requiresDuplicateDetection: queueRequiresDuplicateDetection
    duplicateDetectionHistoryTimeWindow: queueDuplicateDetectionHistoryTimeWindow
    defaultMessageTimeToLive: queueDefaultMessageTimeToLive
  }
}

var identityAdministrators = [
  {
    objectId: identities.outputs.apiPrincipalId
    name: identities.outputs.apiIdentityName
    type: 'ServicePrincipal'
  }
  {
    objectId: identities.outputs.workerPrincipalId
    name: identities.outputs.workerIdentityName
    type: 'ServicePrincipal'
  }
]
var humanAdministrators = empty(postgresAdminObjectId) ? [] : [
  {
    objectId: postgresAdminObjectId
    name: postgresAdminName
    type: postgresAdminType
  }
]

module postgres 'modules/postgres.bicep' = {
  name: 'postgres'
  scope: rg
  params: {
    location: location
    tags: allTags
    serverName: names.postgres
    databaseName: databaseName
    version: postgresVersion
    skuName: postgresSkuName
    skuTier: postgresSkuTier
    storageSizeGB: postgresStorageSizeGB
    highAvailability: postgresHighAvailability
    geoRedundantBackup: postgresGeoRedundantBackup
    publicNetworkAccess: postgresPublicNetworkAccess
    allowAzureServices: postgresAllowAzureServices
    allowedIpRanges: postgresAllowedIpRanges
    entraAdministrators: concat(identityAdministrators, humanAdministrators)
  }
}

module registry 'modules/registry.bicep' = {
  name: 'registry'
  scope: rg
  params: {
    location: location
    tags: allTags
    registryName: names.registry
    skuName: registrySku
  }
}

module network 'modules/network.bicep' = {
  name: 'network'
  scope: rg
  params: {
    location: location
    tags: allTags
    vnetName: names.vnet
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    location: location
    tags: allTags
    planName: names.plan
    functionAppName: names.functionApp
    identityId: identities.outputs.apiIdentityId
    identityClientId: identities.outputs.apiClientId
    identityName: identities.outputs.apiIdentityName
    blobEndpoint: storage.outputs.blobEndpoint
    tableEndpoint: storage.outputs.tableEndpoint
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    imagesContainerName: storage.outputs.imagesContainerName
    resultsContainerName: storage.outputs.resultsContainerName
    serviceBusNamespaceFqdn: serviceBus.outputs.fullyQualifiedNamespace
    queueName: serviceBus.outputs.queueName
    highPriorityQueueName: serviceBus.outputs.highPriorityQueueName
    eventsQueueName: serviceBus.outputs.eventsQueueName
    postgresHost: postgres.outputs.fqdn
    postgresDatabase: postgres.outputs.databaseName
    appInsightsConnectionString: monitoring.outputs.connectionString
    serviceName: otelServiceName
    maximumInstanceCount: functionMaximumInstanceCount
    instanceMemoryMB: functionInstanceMemoryMB
    maxBacklog: maxBacklog
    imageUrlAllowedHosts: imageUrlAllowedHosts
    webhookTimeoutSeconds: webhookTimeoutSeconds
    webhookMaxAttempts: webhookMaxAttempts
    webhookBackoff: webhookBackoff
    webhookBackoffMax: webhookBackoffMax
    jobMaxAttempts: jobMaxAttempts
    reconcileSchedule: reconcileSchedule
    reconcileResendAfter: reconcileResendAfter
    reconcileBatch: reconcileBatch
  }
  dependsOn: [
    roles
  ]
}

module gpuWorkers 'modules/gpu-vmss.bicep' = {
  name: 'gpu-vmss'
  scope: rg
  params: {
    location: location
    tags: allTags
    vmssName: names.vmss
    vmSku: gpuVmSku
    useSpot: gpuUseSpot
    spotEvictionPolicy: gpuSpotEvictionPolicy
    spotMaxPrice: gpuSpotMaxPrice
    adminUsername: gpuAdminUsername
    sshPublicKey: gpuSshPublicKey
    subnetId: network.outputs.workersSubnetId
    identityId: identities.outputs.workerIdentityId
    identityClientId: identities.outputs.workerClientId
    identityName: identities.outputs.workerIdentityName
    registryLoginServer: registry.outputs.loginServer
    workerImage: workerImage
    blobEndpoint: storage.outputs.blobEndpoint
    imagesContainerName: storage.outputs.imagesContainerName
    resultsContainerName: storage.outputs.resultsContainerName
    serviceBusNamespaceFqdn: serviceBus.outputs.fullyQualifiedNamespace
    queueName: serviceBus.outputs.queueName
    highPriorityQueueName: serviceBus.outputs.highPriorityQueueName
    eventsQueueName: serviceBus.outputs.eventsQueueName
    postgresHost: postgres.outputs.fqdn
    postgresDatabase: postgres.outputs.databaseName
    appInsightsConnectionString: monitoring.outputs.connectionString
    serviceName: otelServiceName
    shutdownGraceSeconds: workerShutdownGraceSeconds
    highPriorityBurst: workerHighPriorityBurst
    imageUrlAllowedHosts: imageUrlAllowedHosts
    jobMaxAttempts: jobMaxAttempts
    jobLease: jobLease
    jobTimeout: jobTimeout
    retryBackoff: retryBackoff
    retryBackoffMax: retryBackoffMax
  }
  dependsOn: [
    roles
  ]
}

module autoscale 'modules/autoscale.bicep' = {
  name: 'autoscale'
  scope: rg
  params: {
    location: location
    tags: allTags
    vmssId: gpuWorkers.outputs.vmssId
    vmssName: gpuWorkers.outputs.vmssName
    serviceBusNamespaceId: serviceBus.outputs.namespaceId
    queueName: serviceBus.outputs.queueName
    highPriorityQueueName: serviceBus.outputs.highPriorityQueueName
    minInstances: workerMinInstances
    maxInstances: workerMaxInstances
    defaultInstances: workerMinInstances
    scaleOutThreshold: scaleOutThreshold
    scaleInThreshold: scaleInThreshold
    highPriorityScaleOutThreshold: highPriorityScaleOutThreshold
    highPriorityScaleInThreshold: highPriorityScaleInThreshold
    scaleOutCooldown: scaleOutCooldown
    scaleInCooldown: scaleInCooldown
  }
}

module roles 'modules/roles.bicep' = {
  name: 'roles'
  scope: rg
  params: {
    apiPrincipalId: identities.outputs.apiPrincipalId
    workerPrincipalId: identities.outputs.workerPrincipalId
    serviceBusNamespaceName: serviceBus.outputs.namespaceName
    queueName: serviceBus.outputs.queueName
    highPriorityQueueName: serviceBus.outputs.highPriorityQueueName
    eventsQueueName: serviceBus.outputs.eventsQueueName
    storageAccountName: storage.outputs.accountName
    imagesContainerName: storage.outputs.imagesContainerName
    resultsContainerName: storage.outputs.resultsContainerName
    registryName: registry.outputs.registryName
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    tags: allTags
    namePrefix: names.alerts
    serviceBusNamespaceId: serviceBus.outputs.namespaceId
    queueName: serviceBus.outputs.queueName
    highPriorityQueueName: serviceBus.outputs.highPriorityQueueName
    eventsQueueName: serviceBus.outputs.eventsQueueName
    appInsightsId: monitoring.outputs.appInsightsId
    workerRoleName: workerRoleName
    actionGroupId: actionGroupId
    alertEmail: alertEmail
    backlogThreshold: backlogAlertThreshold
    workerErrorThreshold: workerErrorAlertThreshold
  }
}

module workbook 'modules/workbook.bicep' = {
  name: 'workbook'
  scope: rg
  params: {
    location: location
    tags: allTags
    appInsightsId: monitoring.outputs.appInsightsId
    serviceBusNamespaceId: serviceBus.outputs.namespaceId
  }
}

// ---------------------------------------------------------------------------------------------------- outputs
output AZURE_LOCATION string = location
output AZURE_RESOURCE_GROUP string = rg.name
output API_BASE_URL string = functionApp.outputs.apiBaseUrl
output FUNCTION_APP_NAME string = functionApp.outputs.functionAppName
output STORAGE_ACCOUNT_NAME string = storage.outputs.accountName
output SERVICEBUS_NAMESPACE string = serviceBus.outputs.fullyQualifiedNamespace
output SERVICEBUS_QUEUE_NAME string = serviceBus.outputs.queueName
output SERVICEBUS_HIGH_PRIORITY_QUEUE_NAME string = serviceBus.outputs.highPriorityQueueName
output SERVICEBUS_EVENTS_QUEUE_NAME string = serviceBus.outputs.eventsQueueName
output POSTGRES_HOST string = postgres.outputs.fqdn
output POSTGRES_DATABASE string = postgres.outputs.databaseName
output AZURE_CONTAINER_REGISTRY_NAME string = registry.outputs.registryName
output AZURE_CONTAINER_REGISTRY_ENDPOINT string = registry.outputs.loginServer
output WORKER_IMAGE string = workerImage
output GPU_VMSS_NAME string = gpuWorkers.outputs.vmssName
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.appInsightsName
output API_IDENTITY_NAME string = identities.outputs.apiIdentityName
output WORKER_IDENTITY_NAME string = identities.outputs.workerIdentityName
