// Azure Container Registry for the GPU worker image (Dockerfile.gpu). The admin user is disabled: the workers pull
// with their managed identity (AcrPull), images are pushed with `az acr build` under the deployer's Entra identity.

@description('Azure region of the registry.')
param location string

@description('Tags applied to every resource.')
param tags object

@description('Name of the registry (5-50 letters and digits).')
@minLength(5)
@maxLength(50)
param registryName string

@description('Registry SKU. Premium adds private endpoints, geo-replication and content trust.')
@allowed([
  'Basic'
  'Standard'
  'Premium'
])
param skuName string = 'Standard'

resource registry 'Microsoft.ContainerRegistry/registries@2025-04-01' = {
  // checkov:skip=CKV_AZURE_139:Public endpoint: the workers pull over the internet with Entra tokens; private endpoints need Premium
  // checkov:skip=CKV_AZURE_163:Image vulnerability scanning is Microsoft Defender for Containers, a subscription-level plan, not a registry property
  // checkov:skip=CKV_AZURE_166:Quarantine needs Premium and a scanner to release images
  // checkov:skip=CKV_AZURE_233:Zone redundancy needs Premium
  name: registryName
  location: location
  tags: tags
  sku: {
    name: skuName
  }
  properties: {
    adminUserEnabled: false
    anonymousPullEnabled: false
    publicNetworkAccess: 'Enabled'
    zoneRedundancy: 'Disabled'
  }
}

output registryName string = registry.name
output registryId string = registry.id
output loginServer string = registry.properties.loginServer
