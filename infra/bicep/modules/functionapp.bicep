// The HTTP API, the reconciler and the webhook deliverer: a Function App on the Flex Consumption plan, Python 3.11,
// running as a user-assigned identity. Besides the HTTP functions it runs reconcile_jobs, a timer trigger whose
// schedule is '%RECONCILE_SCHEDULE%' (the host resolves it from the app setting of that name and cannot index the
// function without it), and a Service Bus trigger on the job-events queue (connection "ServiceBusConnection", the
// identity-based ServiceBusConnection__* settings below) that delivers webhooks. Every connection is identity-based (no
// connection string, no key): the app-setting names are the aliases of shared/settings.py Settings (tests/infra checks
// it), plus the platform's own identity settings.

@description('Azure region of the Function App.')
param location string

@description('Tags applied to every resource.')
param tags object

@description('Name of the Flex Consumption plan.')
param planName string

@description('Name of the Function App (the API host is <name>.azurewebsites.net).')
param functionAppName string

@description('Resource id of the Function App\'s user-assigned identity.')
param identityId string

@description('Client id of the Function App\'s user-assigned identity (AZURE_CLIENT_ID).')
param identityClientId string

@description('Name of the identity, which is also its PostgreSQL role name (POSTGRES_USER).')
param identityName string

@description('Blob endpoint of the storage account, https://<account>.blob.core.windows.net/.')
param blobEndpoint string

@description('Table endpoint of the same account, https://<account>.table.core.windows.net/ (the host\'s diagnostic events).')
param tableEndpoint string

@description('URL of the blob container the deployment package is uploaded to.')
param deploymentContainerUrl string

@description('Container for uploaded images (IMAGES_CONTAINER).')
param imagesContainerName string

@description('Container for results (RESULTS_CONTAINER).')
param resultsContainerName string

@description('Fully qualified Service Bus namespace, <name>.servicebus.windows.net.')
param serviceBusNamespaceFqdn string

@description('Name of the normal-priority jobs queue (JOBS_QUEUE_NAME).')
param queueName string

@description('Name of the high-priority jobs queue (JOBS_HIGH_QUEUE_NAME).')
param highPriorityQueueName string

@description('Name of the webhook delivery events queue (JOB_EVENTS_QUEUE_NAME), which the Service Bus trigger reads.')
param eventsQueueName string

@description('Host name of the PostgreSQL server (POSTGRES_HOST).')
param postgresHost string

@description('Name of the application database (POSTGRES_DATABASE).')
param postgresDatabase string

@description('Application Insights connection string (no key-based ingestion: local auth is disabled).')
param appInsightsConnectionString string

@description('OTEL_SERVICE_NAME of the API: the service namespace of its telemetry (cloud_RoleName <name>.api).')
param serviceName string = 'crop-ai'

@description('Largest number of instances the plan may scale out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory per instance in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Largest accepted upload in bytes (MAX_UPLOAD_BYTES); the Functions HTTP limit is 100 MB.')
param maxUploadBytes int = 104857600

@description('Largest image a submit by reference accepts, uploaded or by URL, in bytes (MAX_INPUT_BYTES).')
param maxInputBytes int = 8589934592

@description('Hosts an image_url may name outside the storage account (IMAGE_URL_ALLOWED_HOSTS); empty: none.')
param imageUrlAllowedHosts string

@description('Most jobs in one batch submit (MAX_BATCH_SIZE).')
@minValue(1)
param maxBatchSize int = 100

@description('Queued jobs above which submit answers 429 (MAX_BACKLOG).')
@minValue(1)
param maxBacklog int

@description('Seconds one webhook delivery may take (WEBHOOK_TIMEOUT).')
@minValue(1)
param webhookTimeoutSeconds int

@description('Delivery attempts of one webhook event before it is given up (WEBHOOK_MAX_ATTEMPTS).')
@minValue(1)
param webhookMaxAttempts int

@description('Delay before the second webhook attempt, doubled per attempt (WEBHOOK_BACKOFF, ISO 8601).')
param webhookBackoff string

@description('Longest delay between two webhook attempts (WEBHOOK_BACKOFF_MAX, ISO 8601).')
param webhookBackoffMax string

@description('Attempts a job gets (JOB_MAX_ATTEMPTS): the reconciler fails a job retries_exhausted past it; main.bicep passes the workers the same parameter.')
@minValue(1)
param jobMaxAttempts int

@description('NCRONTAB schedule of the reconciler (RECONCILE_SCHEDULE), resolved by the host from this app setting.')
param reconcileSchedule string

@description('How long a send may stay unconfirmed before the reconciler sends the job again (RECONCILE_RESEND_AFTER, ISO 8601).')
param reconcileResendAfter string

@description('Jobs (and dead letters) the reconciler handles per step and run (RECONCILE_BATCH).')
@minValue(1)
param reconcileBatch int

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Zone redundancy of Flex Consumption plans depends on the region; enable it per region when available
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222:Public network access is the product: the HTTP API is called from outside Azure
  // checkov:skip=CKV_AZURE_212:numberOfWorkers applies to dedicated plans; Flex Consumption scales per instance from zero (alwaysReady can pin warm instances)
  // checkov:skip=CKV_AZURE_213:No fixed instance pool: Flex Consumption replaces unhealthy instances itself, so an App Service health-check path has nothing to evict
  // checkov:skip=CKV_AZURE_17:Client certificates are not part of the API contract (function keys / Entra in front)
  name: functionAppName
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: 'Enabled'
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: [
        // Platform: the host's own storage, through the user-assigned identity (Flex Consumption needs the blob URI,
        // credential and client id; the table URI lets the host persist its diagnostic events)
        {
          name: 'AzureWebJobsStorage__blobServiceUri'
          value: blobEndpoint
        }
        {
          name: 'AzureWebJobsStorage__tableServiceUri'
          value: tableEndpoint
        }
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: identityClientId
        }
        // Service Bus: identity-based connection (bindings also read __credential/__clientId)
        {
          name: 'ServiceBusConnection__fullyQualifiedNamespace'
          value: serviceBusNamespaceFqdn
        }
        {
          name: 'ServiceBusConnection__credential'
          value: 'managedidentity'
        }
        {
          name: 'ServiceBusConnection__clientId'
          value: identityClientId
        }
        {
          name: 'JOBS_QUEUE_NAME'
          value: queueName
        }
        {
          name: 'JOBS_HIGH_QUEUE_NAME'
          value: highPriorityQueueName
        }
        {
          name: 'JOB_EVENTS_QUEUE_NAME'
          value: eventsQueueName
        }
        {
          name: 'IMAGES_CONTAINER'
          value: imagesContainerName
        }
        {
          name: 'RESULTS_CONTAINER'
          value: resultsContainerName
        }
        // PostgreSQL: Entra token as the password (shared/pg_entra.py); no DATABASE_URL, no password
        {
          name: 'POSTGRES_HOST'
          value: postgresHost
        }
        {
          name: 'POSTGRES_DATABASE'
          value: postgresDatabase
        }
        {
          name: 'POSTGRES_USER'
          value: identityName
        }
        {
          name: 'MAX_UPLOAD_BYTES'
          value: string(maxUploadBytes)
        }
        {
          name: 'MAX_BATCH_SIZE'
          value: string(maxBatchSize)
        }
        // Inputs by reference (issue 12): direct uploads to images/uploads/ and image_url submits.
        {
          name: 'MAX_INPUT_BYTES'
          value: string(maxInputBytes)
        }
        {
          name: 'IMAGE_URL_ALLOWED_HOSTS'
          value: imageUrlAllowedHosts
        }
        {
          name: 'MAX_BACKLOG'
          value: string(maxBacklog)
        }
        // Webhooks (the job-events trigger). Never to http:// or loopback/private addresses in Azure: that is only
        // for the local stack, so it is no parameter (tests/infra checks the literal).
        {
          name: 'WEBHOOK_ALLOW_PRIVATE'
          value: 'false'
        }
        {
          name: 'WEBHOOK_TIMEOUT'
          value: string(webhookTimeoutSeconds)
        }
        {
          name: 'WEBHOOK_MAX_ATTEMPTS'
          value: string(webhookMaxAttempts)
        }
        {
          name: 'WEBHOOK_BACKOFF'
          value: webhookBackoff
        }
        {
          name: 'WEBHOOK_BACKOFF_MAX'
          value: webhookBackoffMax
        }
        // The reconciler (functions/reconciler.py): its timer's schedule and the lifecycle settings it reads
        {
          name: 'RECONCILE_SCHEDULE'
          value: reconcileSchedule
        }
        {
          name: 'RECONCILE_RESEND_AFTER'
          value: reconcileResendAfter
        }
        {
          name: 'RECONCILE_BATCH'
          value: string(reconcileBatch)
        }
        {
          name: 'JOB_MAX_ATTEMPTS'
          value: string(jobMaxAttempts)
        }
        // DefaultAzureCredential picks the user-assigned identity by its client id
        {
          name: 'AZURE_CLIENT_ID'
          value: identityClientId
        }
        // Telemetry with Entra authentication (local auth is disabled on the component)
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsightsConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'ClientId=${identityClientId};Authorization=AAD'
        }
        {
          name: 'OTEL_SERVICE_NAME'
          value: serviceName
        }
      ]
    }
  }
}

// Keyless deployment too: no FTP or SCM basic-auth publishing credentials (az functionapp deploy uses Entra).
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

output functionAppName string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
output apiBaseUrl string = 'https://${functionApp.properties.defaultHostName}/api'
