// Service Bus namespace and its three queues. Keyless: SAS (local) authentication is disabled, so senders and
// receivers need Entra role assignments, one per queue (modules/roles.bicep).
//   jobs        normal-priority jobs (JOBS_QUEUE_NAME): the API sends, the GPU workers receive.
//   jobs-high   high-priority jobs (JOBS_HIGH_QUEUE_NAME): the same properties as jobs, from the same parameters,
//               so the two can never drift apart; workers prefer it (WORKER_HIGH_PRIORITY_BURST).
//   job-events  webhook delivery events (JOB_EVENTS_QUEUE_NAME): API and workers send, a Service Bus-triggered
//               Function delivers; its own properties (maxDeliveryCount 3), its own parameters.
// The property defaults must equal main.bicep's, main.bicepparam's and local/servicebus.config.json's
// (tests/infra/test_settings_alignment.py holds the expected values). The app reads none of them: a job's attempts
// are bounded by JOB_MAX_ATTEMPTS, a webhook's by WEBHOOK_MAX_ATTEMPTS; a message past maxDeliveryCount (deliveries
// spent on crashes, never on a claim) is dead-lettered, and the reconciler re-drives the job of a letter in jobs or
// jobs-high.

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

@description('Name of the normal-priority jobs queue (JOBS_QUEUE_NAME). The property parameters below apply to it and to the high-priority queue.')
param queueName string = 'jobs'

@description('Peek-lock duration of the jobs queues (ISO 8601); the worker renews the lock while it works.')
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

@description('Time a message may wait in a jobs queue before it expires (ISO 8601).')
param defaultMessageTimeToLive string = 'P1D'

@description('Name of the high-priority jobs queue (JOBS_HIGH_QUEUE_NAME); it has the jobs queue\'s properties.')
param highPriorityQueueName string = 'jobs-high'

@description('Name of the webhook delivery events queue (JOB_EVENTS_QUEUE_NAME).')
param eventsQueueName string = 'job-events'

@description('Peek-lock duration of the events queue (ISO 8601): one webhook delivery (WEBHOOK_TIMEOUT) fits in it.')
param eventsLockDuration string = 'PT1M'

@description('Deliveries of an event before the broker dead-letters it; WEBHOOK_MAX_ATTEMPTS bounds the webhook attempts, this only the deliveries lost to crashes.')
@minValue(1)
param eventsMaxDeliveryCount int = 3

@description('Move expired events to the dead-letter queue (TTLExpiredException) instead of dropping them.')
param eventsDeadLetteringOnMessageExpiration bool = true

@description('Drop an event whose MessageId was already seen within the history window: a retried send of the same event.')
param eventsRequiresDuplicateDetection bool = true

@description('How long event message ids are remembered for duplicate detection (ISO 8601).')
param eventsDuplicateDetectionHistoryTimeWindow string = 'PT10M'

@description('Time an event may wait in the queue before it expires (ISO 8601).')
param eventsDefaultMessageTimeToLive string = 'P1D'

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

// The same parameters as the jobs queue: high priority changes the order in which workers receive, nothing else.
resource highPriorityQueue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: namespace
  name: highPriorityQueueName
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

resource eventsQueue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: namespace
  name: eventsQueueName
  properties: {
    lockDuration: eventsLockDuration
    maxDeliveryCount: eventsMaxDeliveryCount
    deadLetteringOnMessageExpiration: eventsDeadLetteringOnMessageExpiration
    requiresDuplicateDetection: eventsRequiresDuplicateDetection
    duplicateDetectionHistoryTimeWindow: eventsDuplicateDetectionHistoryTimeWindow
    defaultMessageTimeToLive: eventsDefaultMessageTimeToLive
    requiresSession: false
    enablePartitioning: false
  }
}

output namespaceName string = namespace.name
output namespaceId string = namespace.id
output queueName string = queue.name
output queueId string = queue.id
output highPriorityQueueName string = highPriorityQueue.name
output highPriorityQueueId string = highPriorityQueue.id
output eventsQueueName string = eventsQueue.name
output eventsQueueId string = eventsQueue.id
// ServiceBusConnection__fullyQualifiedNamespace: the host of https://<name>.servicebus.windows.net:443/
output fullyQualifiedNamespace string = split(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':')[0]
