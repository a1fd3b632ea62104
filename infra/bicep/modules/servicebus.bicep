// Service Bus namespace and the jobs queue. Keyless: SAS (local) authentication is disabled, so senders and
// receivers need Entra role assignments (modules/roles.bicep). The queue properties are parameters whose defaults
// must equal main.bicep's, main.bicepparam's and local/servicebus.config.json's (tests/infra/test_settings_alignment.py
// holds the expected values). The app reads none of them: a job's attempts are bounded by JOB_MAX_ATTEMPTS; a message
// past maxDeliveryCount (deliveries spent on crashes, never on a claim) is dead-lettered and re-driven by the reconciler.

@description('Azure region of the namespace.')
param location string

@description('Tags applied to every resource.')
param tags object

@description('Name of the Service Bus namespace.')
param namespaceName string

@description('Namespace tier: Standard (shared, pay per operation) or Premium (dedicated messaging units).')
@allowed([
  'Standard'
  'Premium'
])
param skuName string = 'Standard'

@description('Messaging units when skuName is Premium (1, 2, 4, 8 or 16); ignored for Standard.')
@allowed([
  1
  2
  4
  8
  16
])
param premiumCapacity int = 1

@description('Name of the jobs queue (JOBS_QUEUE_NAME).')
param queueName string = 'jobs'

@description('Peek-lock duration (ISO 8601); the worker renews the lock while it works.')
param lockDuration string = 'PT1M'

@description('Deliveries before the broker dead-letters a message (MaxDeliveryCountExceeded; the reconciler re-drives its job).')
@minValue(1)
param maxDeliveryCount int = 5

@description('Move expired messages to the dead-letter queue (TTLExpiredException) instead of dropping them.')
param deadLetteringOnMessageExpiration bool = true

@description('Drop a message whose MessageId ({job_id}:{generation}) was already seen within the history window: a retried send of the same generation.')
param requiresDuplicateDetection bool = true

@description('How long message ids are remembered for duplicate detection (ISO 8601).')
param duplicateDetectionHistoryTimeWindow string = 'PT10M'

@description('Time a message may wait in the queue before it expires (ISO 8601).')
param defaultMessageTimeToLive string = 'P1D'

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: namespaceName
  location: location
  tags: tags
  sku: {
    name: skuName
    tier: skuName
    capacity: skuName == 'Premium' ? premiumCapacity : null
  }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: namespace
  name: queueName
  properties: {
    lockDuration: lockDuration
    maxDeliveryCount: maxDeliveryCount
    deadLetteringOnMessageExpiration: deadLetteringOnMessageExpiration
    requiresDuplicateDetection: requiresDuplicateDetection
    duplicateDetectionHistoryTimeWindow: duplicateDetectionHistoryTimeWindow
    defaultMessageTimeToLive: defaultMessageTimeToLive
    requiresSession: false
    enablePartitioning: false
  }
}

output namespaceName string = namespace.name
output namespaceId string = namespace.id
output queueName string = queue.name
output queueId string = queue.id
// ServiceBusConnection__fullyQualifiedNamespace: the host of https://<name>.servicebus.windows.net:443/
output fullyQualifiedNamespace string = split(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':')[0]
