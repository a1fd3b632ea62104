// Development defaults, for both deployment paths (docs/deploy.md):
//   azd up          azd reads this file (it prefers main.bicepparam to a main.parameters.json) and passes its
//                   environment (.azure/<env>/.env: AZURE_ENV_NAME, AZURE_LOCATION, and what `azd env set` adds);
//   az deployment   the variables of the calling shell:
//     GPU_SSH_PUBLIC_KEY="$(cat ~/.ssh/id_ed25519.pub)" \
//     az deployment sub create --name cropai-dev --location westeurope --parameters infra/bicep/main.bicepparam
using 'main.bicep'

param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'dev')
param location = readEnvironmentVariable('AZURE_LOCATION', 'westeurope')
param gpuSshPublicKey = readEnvironmentVariable('GPU_SSH_PUBLIC_KEY')
param alertEmail = readEnvironmentVariable('ALERT_EMAIL', '')
param workerImage = readEnvironmentVariable('WORKER_IMAGE', 'crop-ai-worker:latest')

// An Entra administrator of PostgreSQL who runs the migrations (docs/deploy.md, step 3); none unless set.
param postgresAdminObjectId = readEnvironmentVariable('POSTGRES_ADMIN_OBJECT_ID', '')
param postgresAdminName = readEnvironmentVariable('POSTGRES_ADMIN_NAME', '')
param postgresAdminType = readEnvironmentVariable('POSTGRES_ADMIN_TYPE', 'Group')

// The jobs queues (jobs and jobs-high share these): the same values as local/servicebus.config.json
// (tests/infra/test_settings_alignment.py checks it).
param queueName = 'jobs'
param queueLockDuration = 'PT1M'
param queueMaxDeliveryCount = 5
param queueDeadLetteringOnMessageExpiration = true
param queueRequiresDuplicateDetection = true
param queueDuplicateDetectionHistoryTimeWindow = 'PT10M'
param queueDefaultMessageTimeToLive = 'P1D'

// Small and cheap for development: Burstable PostgreSQL without HA, at most two Spot T4 workers, scale to zero.
param postgresSkuName = 'Standard_B1ms'
param postgresSkuTier = 'Burstable'
param postgresHighAvailability = 'Disabled'
param gpuVmSku = 'Standard_NC4as_T4_v3'
param gpuUseSpot = true
param gpuSpotEvictionPolicy = 'Delete'
param workerMinInstances = 0
param workerMaxInstances = 2
param inputRetentionDays = 7
