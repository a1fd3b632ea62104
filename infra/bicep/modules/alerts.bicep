// Metric alerts that page someone: a jobs dead-letter queue that is not being drained (the reconciler is broken), a
// webhook event that was dead-lettered (nothing drains those), a backlog that keeps growing, and exceptions reported
// by the workers. Every Service Bus alert filters on EntityName with one value per queue: Azure Monitor evaluates
// each queue's time series on its own, so one queue alone can fire it. They notify an existing action group
// (actionGroupId) or one created here for alertEmail; with neither they still fire and show in the Portal's Alerts
// blade.

@description('Tags applied to every resource.')
param tags object

@description('Prefix of the alert names.')
param namePrefix string

@description('Resource id of the Service Bus namespace.')
param serviceBusNamespaceId string

@description('Name of the normal-priority jobs queue.')
param queueName string

@description('Name of the high-priority jobs queue.')
param highPriorityQueueName string

@description('Name of the webhook delivery events queue.')
param eventsQueueName string

@description('Resource id of the Application Insights component.')
param appInsightsId string

@description('cloud_RoleName of the workers in Application Insights: <OTEL_SERVICE_NAME>.gpu-worker (shared/telemetry.py).')
param workerRoleName string

@description('Resource id of an existing action group to notify; empty to create one from alertEmail (or none).')
param actionGroupId string = ''

@description('E-mail address for a new action group, used when actionGroupId is empty; empty for none.')
param alertEmail string = ''

@description('Active messages in either jobs queue above which the backlog alert fires.')
@minValue(1)
param backlogThreshold int = 100

@description('Worker exceptions per 15 minutes above which the worker-errors alert fires.')
@minValue(0)
param workerErrorThreshold int = 0

var createActionGroup = empty(actionGroupId) && !empty(alertEmail)

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (createActionGroup) {
  name: '${namePrefix}-oncall'
  location: 'global'
  tags: tags
  properties: {
    enabled: true
    groupShortName: 'cropai'
    emailReceivers: [
      {
        name: 'oncall'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var targetActionGroupId = createActionGroup ? actionGroup.id : actionGroupId
var actions = empty(targetActionGroupId) ? [] : [
  {
    actionGroupId: targetActionGroupId
  }
]

// The dead-letter queues of jobs and jobs-high are drained by the reconciler (the timer Function reconcile_jobs,
// RECONCILE_SCHEDULE: every minute): it reconciles each letter's job, records the letter in PostgreSQL (table
// dead_letters, where failed jobs are investigated) and completes it. Dead letters themselves are routine now (the
// worker dead-letters a bad input, a timed-out or an exhausted job; the broker a message past its delivery count or
// TTL), so a letter present at one moment means nothing. What matters is a queue that stays non-empty: the *Minimum* of
// DeadletteredMessages over 15 minutes (fifteen reconciler periods) above 0 means no run emptied it in that time, i.e.
// the reconciler is not running (host down, RECONCILE_SCHEDULE broken, the function disabled) or each run fails
// (PostgreSQL down, the identity's Data Owner role on the queue missing); meanwhile redrives and the reconciler's other
// repairs (resend, expire) stop too. It also fires when letters keep arriving faster than the reconciler drains them
// for 15 minutes, which deserves a look as well. Keep the window at several reconciler periods if RECONCILE_SCHEDULE is
// slowed.
// The alert keeps its name from when it fired on any dead letter, so a redeployment updates it in place.
resource deadLettersNotDrained 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${namePrefix}-dead-lettered'
  location: 'global'
  tags: tags
  properties: {
    description: 'The dead-letter queue of ${queueName} or ${highPriorityQueueName} (the alert\'s EntityName says which) has not been empty for 15 minutes: the reconciler (Function reconcile_jobs) is not draining it. Check its runs and exceptions in Application Insights (the API\'s cloud role, <OTEL_SERVICE_NAME>.api), then the letters in Service Bus Explorer; drained letters are in the dead_letters table.'
    severity: 1
    enabled: true
    scopes: [
      serviceBusNamespaceId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'DeadletteredMessages'
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: 'DeadletteredMessages'
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                queueName
                highPriorityQueueName
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Minimum'
        }
      ]
    }
    actions: actions
  }
}

// Nothing drains the dead-letter queue of job-events: a letter there is a webhook event that the delivery Function
// could not settle within the queue's maxDeliveryCount (its host crashed or it threw each time) or that expired
// unread (TTL 1 day). The job itself is unaffected (its row in PostgreSQL is the truth and GET /api/jobs/{id} shows
// it), only its client was not notified. So any letter deserves a look: Maximum over the window above 0. The alert
// stays active until the letters are inspected and removed (Service Bus Explorer, receive and delete).
resource eventsDeadLettered 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${namePrefix}-events-dead-lettered'
  location: 'global'
  tags: tags
  properties: {
    description: 'Webhook events in the dead-letter queue of ${eventsQueueName}: their deliveries were abandoned (delivery Function crashed or failed each time) or they expired unread. Look at the Service Bus-triggered delivery Function\'s exceptions in Application Insights (<OTEL_SERVICE_NAME>.api), then at the letters (DeadLetterReason, DeadLetterErrorDescription) in Service Bus Explorer; remove them once handled.'
    severity: 2
    enabled: true
    scopes: [
      serviceBusNamespaceId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'EventsDeadletteredMessages'
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: 'DeadletteredMessages'
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                eventsQueueName
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Maximum'
        }
      ]
    }
    actions: actions
  }
}

resource backlog 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${namePrefix}-backlog'
  location: 'global'
  tags: tags
  properties: {
    description: 'More than ${backlogThreshold} active messages in ${queueName} or ${highPriorityQueueName} (the alert\'s EntityName says which) for 15 minutes: workers are not keeping up (autoscale at its maximum, Spot capacity unavailable, or workers failing).'
    severity: 2
    enabled: true
    scopes: [
      serviceBusNamespaceId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'ActiveMessages'
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: 'ActiveMessages'
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                queueName
                highPriorityQueueName
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: backlogThreshold
          timeAggregation: 'Average'
        }
      ]
    }
    actions: actions
  }
}

resource workerErrors 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${namePrefix}-worker-errors'
  location: 'global'
  tags: tags
  properties: {
    description: 'Exceptions reported by ${workerRoleName} in Application Insights. Search them under Failures > Exceptions, filtered by cloud role name.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'WorkerExceptions'
          metricNamespace: 'microsoft.insights/components'
          metricName: 'exceptions/count'
          dimensions: [
            {
              name: 'cloud/roleName'
              operator: 'Include'
              values: [
                workerRoleName
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: workerErrorThreshold
          timeAggregation: 'Count'
        }
      ]
    }
    actions: actions
  }
}

output actionGroupId string = targetActionGroupId
