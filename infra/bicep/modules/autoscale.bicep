// Autoscale of the GPU scale set on the backlog of both jobs queues: Service Bus ActiveMessages, one rule per queue
// (filtered to it with the EntityName dimension) and direction. Autoscale scales out when *any* scale-out rule is
// met and scales in only when *all* scale-in rules are met (Azure Monitor autoscale evaluation,
// learn.microsoft.com/azure/azure-monitor/autoscale/autoscale-understanding-settings): so one more VM while either
// queue's backlog stays above its threshold, one fewer only while both stay at or below theirs. Minimum 0 lets the
// pool scale to zero when both are idle. Cool-downs cover a GPU VM's boot (driver, image pull).

@description('Azure region of the autoscale setting.')
param location string

@description('Tags applied to every resource.')
param tags object

@description('Resource id of the GPU scale set.')
param vmssId string

@description('Name of the GPU scale set.')
param vmssName string

@description('Resource id of the Service Bus namespace.')
param serviceBusNamespaceId string

@description('Name of the normal-priority jobs queue.')
param queueName string

@description('Name of the high-priority jobs queue.')
param highPriorityQueueName string

@description('Fewest worker VMs (0 scales to zero when both queues are empty).')
@minValue(0)
param minInstances int = 0

@description('Most worker VMs.')
@minValue(1)
param maxInstances int = 4

@description('Worker VMs when the metric is unavailable.')
@minValue(0)
param defaultInstances int = 0

@description('Scale out when the normal-priority queue\'s average active message count over the window is greater than this.')
@minValue(0)
param scaleOutThreshold int = 0

@description('Scale in (if the high-priority queue agrees) when the normal-priority queue\'s average active message count over the window is at most this.')
@minValue(0)
param scaleInThreshold int = 0

@description('Scale out when the high-priority queue\'s average active message count over the window is greater than this.')
@minValue(0)
param highPriorityScaleOutThreshold int = 0

@description('Scale in (if the normal-priority queue agrees) when the high-priority queue\'s average active message count over the window is at most this.')
@minValue(0)
param highPriorityScaleInThreshold int = 0

@description('VMs added per scale-out step.')
@minValue(1)
param scaleOutStep int = 1

@description('Averaging window of the scale-out rule (ISO 8601).')
param scaleOutWindow string = 'PT5M'

@description('Averaging window of the scale-in rule (ISO 8601); longer, so that a short lull does not kill warm VMs.')
param scaleInWindow string = 'PT15M'

@description('Wait after a scale-out before the next scale action (ISO 8601); covers VM boot and image pull.')
param scaleOutCooldown string = 'PT10M'

@description('Wait after a scale-in before the next scale action (ISO 8601).')
param scaleInCooldown string = 'PT10M'

var queueFilter = [
  {
    DimensionName: 'EntityName'
    Operator: 'Equals'
    Values: [
      queueName
    ]
  }
]

var highPriorityQueueFilter = [
  {
    DimensionName: 'EntityName'
    Operator: 'Equals'
    Values: [
      highPriorityQueueName
    ]
  }
]

resource autoscale 'Microsoft.Insights/autoscalesettings@2022-10-01' = {
  name: 'autoscale-${vmssName}'
  location: location
  tags: tags
  properties: {
    name: 'autoscale-${vmssName}'
    enabled: true
    targetResourceUri: vmssId
    profiles: [
      {
        name: 'queue-backlog'
        capacity: {
          minimum: string(minInstances)
          maximum: string(maxInstances)
          default: string(defaultInstances)
        }
        rules: [
          // Out: either queue's backlog is enough.
          {
            metricTrigger: {
              metricName: 'ActiveMessages'
              metricNamespace: 'Microsoft.ServiceBus/namespaces'
              metricResourceUri: serviceBusNamespaceId
              dimensions: queueFilter
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: scaleOutWindow
              timeAggregation: 'Average'
              operator: 'GreaterThan'
              threshold: scaleOutThreshold
            }
            scaleAction: {
              direction: 'Increase'
              type: 'ChangeCount'
              value: string(scaleOutStep)
              cooldown: scaleOutCooldown
            }
          }
          {
            metricTrigger: {
              metricName: 'ActiveMessages'
              metricNamespace: 'Microsoft.ServiceBus/namespaces'
              metricResourceUri: serviceBusNamespaceId
              dimensions: highPriorityQueueFilter
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: scaleOutWindow
              timeAggregation: 'Average'
              operator: 'GreaterThan'
              threshold: highPriorityScaleOutThreshold
            }
            scaleAction: {
              direction: 'Increase'
              type: 'ChangeCount'
              value: string(scaleOutStep)
              cooldown: scaleOutCooldown
            }
          }
          // In: only when both queues are low (autoscale requires every scale-in rule).
          {
            metricTrigger: {
              metricName: 'ActiveMessages'
              metricNamespace: 'Microsoft.ServiceBus/namespaces'
              metricResourceUri: serviceBusNamespaceId
              dimensions: queueFilter
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: scaleInWindow
              timeAggregation: 'Average'
              operator: 'LessThanOrEqual'
              threshold: scaleInThreshold
            }
            scaleAction: {
              direction: 'Decrease'
              type: 'ChangeCount'
              value: '1'
              cooldown: scaleInCooldown
            }
          }
          {
            metricTrigger: {
              metricName: 'ActiveMessages'
              metricNamespace: 'Microsoft.ServiceBus/namespaces'
              metricResourceUri: serviceBusNamespaceId
              dimensions: highPriorityQueueFilter
              timeGrain: 'PT1M'
              statistic: 'Average'
              timeWindow: scaleInWindow
              timeAggregation: 'Average'
              operator: 'LessThanOrEqual'
              threshold: highPriorityScaleInThreshold
            }
            scaleAction: {
              direction: 'Decrease'
              type: 'ChangeCount'
              value: '1'
              cooldown: scaleInCooldown
            }
          }
        ]
      }
    ]
  }
}

output autoscaleName string = autoscale.name
