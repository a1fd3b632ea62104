// Alerts that page someone. Metric alerts: a jobs dead-letter queue that is not being drained (the reconciler is
// broken), a webhook event that was dead-lettered (nothing drains those), a backlog that keeps growing, and exceptions
// reported by the workers. Every Service Bus alert filters on EntityName with one value per queue: Azure Monitor
// evaluates each queue's time series on its own, so one queue alone can fire it. Log search alerts on Application
// Insights (the app's OpenTelemetry metrics and per-job spans: shared/metrics.py, docs/monitoring.md): the p95 run
// duration over a threshold, no healthy worker while jobs wait, and the failure rate. Their queries are the
// multi-line strings below; tests/unit/test_metrics.py parses them and fails if one names a metric, a dimension or a
// span attribute that the code does not emit. They notify an existing action group (actionGroupId) or one created
// here for alertEmail; with neither they still fire and show in the Portal's Alerts blade.

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

@description('Azure region of the log search alert rules (they are regional, unlike metric alerts).')
param location string = resourceGroup().location

@description('Seconds of p95 run duration (claim to settlement) of an analysis over 30 minutes above which the duration alert fires.')
@minValue(1)
param durationP95ThresholdSeconds int = 900

@description('Percent of the jobs that ended (succeeded or failed) over 30 minutes that failed, above which the failure-rate alert fires.')
@minValue(1)
@maxValue(100)
param failureRateThresholdPercent int = 20

@description('Fewest jobs in the window (the duration alert: per analysis) for the duration and failure-rate alerts to judge.')
@minValue(1)
param minJobsForRateAlerts int = 5

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
var logAlertActions = {
  actionGroups: empty(targetActionGroupId) ? [] : [
    targetActionGroupId
  ]
}

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

// ----------------------------------------------------------------------------- log search alerts (Application Insights)
// Percentiles come from the worker's per-job span ('process job', a consumer span: one row per job in `requests`, its
// attributes in customDimensions), never from customMetrics, where the exporter stores a histogram as sum, count, min
// and max per minute. percentilew weighs each row by itemCount, so sampling (if it is ever enabled) does not skew it.
// A rule's window is its query's time range: the queries need no time filter.
var durationQuery = '''
requests
| where name == "process job"
| extend run_s = todouble(customDimensions["crop_ai.run_s"]), analysis = tostring(customDimensions["crop_ai.analysis"])
| where isnotnull(run_s)
| summarize p95_s = percentilew(run_s, itemCount, 95), jobs = sum(itemCount) by analysis
| where jobs >= __MIN_JOBS__
'''

resource durationP95 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-duration-p95'
  location: location
  tags: tags
  properties: {
    displayName: '${namePrefix}-duration-p95'
    description: 'The p95 run duration (claim to settlement) of an analysis (the alert\'s analysis dimension says which) over the last 30 minutes is above ${durationP95ThresholdSeconds} s. In the workbook Crop AI operations, the stage durations say whether download, analysis or upload slowed down and the slowest jobs link to their end-to-end traces; check the GPU panels and the workers alive too.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT30M'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: replace(durationQuery, '__MIN_JOBS__', string(minJobsForRateAlerts))
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'p95_s'
          dimensions: [
            {
              name: 'analysis'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: durationP95ThresholdSeconds
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: logAlertActions
  }
}

// No healthy worker while jobs wait. Service Bus's ActiveMessages cannot reach a log query (the metric is not
// exportable through diagnostic settings), so the backlog is the API's own reading, crop_ai.jobs.queued: the queued
// jobs admission control last counted, reported for 5 minutes after each count by the API instance that counted.
// Liveness is crop_ai.worker.heartbeat: 1 every minute from each worker whose heartbeat is healthy (the --healthcheck
// rule). It fires when, over 15 minutes, every backlog reading was above 0 and no worker reported a healthy beat: the
// scale set did not start workers (Spot capacity, image pull, cloud-init) or they crash or hang.
var workersSilentQuery = '''
let alive = toscalar(customMetrics
    | where name == "crop_ai.worker.heartbeat" and valueMax >= 1
    | summarize dcount(tostring(customDimensions["worker"])));
customMetrics
| where name == "crop_ai.jobs.queued"
| summarize queued = min(valueMin)
| where queued > 0 and alive == 0
'''

resource workersSilent 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-workers-silent'
  location: location
  tags: tags
  properties: {
    displayName: '${namePrefix}-workers-silent'
    description: 'Jobs have been queued for 15 minutes and no worker reported a healthy heartbeat (crop_ai.worker.heartbeat) meanwhile. Check the GPU scale set (instances, Spot evictions, autoscale history), then the workers\' logs (cloud role <OTEL_SERVICE_NAME>.gpu-worker) and their containers (docker ps: the HEALTHCHECK).'
    severity: 1
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: workersSilentQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: logAlertActions
  }
}

// Failure rate: the jobs settled 'failed' (a permanent error, retries exhausted, the time limit) among those that
// ended (succeeded or failed) over 30 minutes; retries, drains and cancellations count neither way.
var failureRateQuery = '''
customMetrics
| where name == "crop_ai.jobs.completed"
| extend outcome = tostring(customDimensions["outcome"])
| summarize failed = sumif(valueSum, outcome == "failed"), ended = sumif(valueSum, outcome in ("succeeded", "failed"))
| where ended >= __MIN_JOBS__
| extend failed_pct = 100.0 * failed / ended
'''

resource failureRate 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-failure-rate'
  location: location
  tags: tags
  properties: {
    displayName: '${namePrefix}-failure-rate'
    description: 'More than ${failureRateThresholdPercent}% of the jobs that ended in the last 30 minutes failed. The workbook Crop AI operations shows the failures by code; the failed jobs\' error_code and error_message are in GET /api/jobs?status=failed, their traces in Application Insights.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT30M'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: replace(failureRateQuery, '__MIN_JOBS__', string(minJobsForRateAlerts))
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'failed_pct'
          operator: 'GreaterThan'
          threshold: failureRateThresholdPercent
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: logAlertActions
  }
}

output actionGroupId string = targetActionGroupId
