// Blob Storage for inputs (images), results and the Function App's deployment package; also the Functions host
// storage (AzureWebJobsStorage: blobs, and tables for the host's diagnostic events). Keyless: shared-key access is
// off, so every client authenticates with Microsoft Entra ID. Inputs are deleted after N days.

@description('Azure region of the storage account.')
param location string

@description('Tags applied to every resource.')
param tags object

@description('Name of the storage account (3-24 lowercase letters and digits).')
@minLength(3)
@maxLength(24)
param storageAccountName string

@description('Storage redundancy SKU.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param skuName string = 'Standard_ZRS'

@description('Container for uploaded GeoTIFFs (images/{job_id}/input.tif).')
param imagesContainerName string = 'images'

@description('Container for analysis results.')
param resultsContainerName string = 'results'

@description('Container the Flex Consumption Function App deploys its package from.')
param deploymentContainerName string = 'deploymentpackage'

@description('Days after which input images are deleted by the lifecycle rule (direct uploads under images/uploads/ too, submitted or not).')
@minValue(2)
param inputRetentionDays int = 7

@description('Days deleted blobs and containers stay recoverable (soft delete).')
@minValue(1)
@maxValue(365)
param softDeleteRetentionDays int = 7

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // Public endpoint with Entra-only auth: Flex Consumption without VNet integration and the GPU workers reach it
  // over the internet; docs/deploy.md describes the private-endpoint variant.
  // checkov:skip=CKV_AZURE_59:Public endpoint required by Flex Consumption without VNet integration; shared keys are off, Entra RBAC only
  // checkov:skip=CKV_AZURE_206:Inputs are transient (deleted after N days) and results are also in PostgreSQL; ZRS by default, GRS/GZRS through the skuName parameter
  // checkov:skip=CKV_AZURE_43:The name is a parameter (st + uniqueString from main.bicep), length-checked by @minLength/@maxLength; checkov cannot resolve it
  // checkov:skip=CKV_AZURE_35:Default network action Allow, for the public-endpoint reason of CKV_AZURE_59; data access is Entra-only (allowSharedKeyAccess false)
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    isLocalUserEnabled: false
    isSftpEnabled: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
  }
}

resource imagesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: imagesContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource resultsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: resultsContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

// One rule for the images container: job inputs ({job_id}/input.tif, a URL job's {job_id}/input.json) and direct
// uploads (uploads/{id}/input.tif, docs/deploy.md): an upload never submitted expires like an input. A submitted one
// is its job's input, read in place: submit takes only a block blob written in the last 24 h
// (shared.by_reference.UPLOAD_MAX_AGE), so its job has inputRetentionDays less a day to run. Append blobs (which the
// write SAS could create) expire too; page blobs are out of lifecycle management's reach and never become jobs.
resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          enabled: true
          name: 'delete-inputs'
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
                'appendBlob'
              ]
              prefixMatch: [
                '${imagesContainerName}/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: inputRetentionDays
                }
              }
            }
          }
        }
      ]
    }
  }
}

output accountName string = account.name
output accountId string = account.id
output blobEndpoint string = account.properties.primaryEndpoints.blob
output tableEndpoint string = account.properties.primaryEndpoints.table
output imagesContainerName string = imagesContainer.name
output resultsContainerName string = resultsContainer.name
output deploymentContainerUrl string = '${account.properties.primaryEndpoints.blob}${deploymentContainer.name}'
