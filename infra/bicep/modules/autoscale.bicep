// Autoscale of the GPU scale set on the jobs queue's backlog: Service Bus ActiveMessages (filtered to the queue
// with the EntityName dimension). Out when the backlog stays above a threshold, in when it stays at or below
// another; minimum 0 lets the pool scale to zero when idle. Cool-downs cover a GPU VM's boot (driver, image pull).

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

@description('Name of the jobs queue.')
param queueName string

@description('Fewest worker VMs (0 scales to zero when the queue is empty).')
@minValue(0)
param minInstances int = 0

@description('Most worker VMs.')
@minValue(1)
param maxInstances int = 4

@description('Worker VMs when the metric is unavailable.')
@minValue(0)
param defaultInstances int = 0

@description('Scale out when the average active message count over the window is greater than this.')
@minValue(0)
param scaleOutThreshold int = 0

@description('Scale in when the average active message count over the window is at most this.')
@minValue(0)
param scaleInThreshold int = 0

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
        ]
      }
    ]
  }
}

output autoscaleName string = autoscale.name
