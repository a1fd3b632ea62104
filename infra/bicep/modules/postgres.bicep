// PostgreSQL Flexible Server with Microsoft Entra authentication only (password authentication disabled, so there
// is no administrator password anywhere). The Function App's and the workers' identities are registered as Entra
// principals of the server; the app connects as its identity with an access token (shared/pg_entra.py).

@description('Azure region of the server.')
param location string

@description('Tags applied to every resource.')
param tags object

@description('Name of the PostgreSQL Flexible Server.')
param serverName string

@description('Name of the application database (POSTGRES_DATABASE).')
param databaseName string = 'cropai'

@description('PostgreSQL major version.')
@allowed([
  '14'
  '15'
  '16'
])
param version string = '16'

@description('Compute SKU name, e.g. Standard_B1ms (Burstable) or Standard_D2ds_v5 (GeneralPurpose).')
param skuName string = 'Standard_B1ms'

@description('Compute tier matching skuName.')
@allowed([
  'Burstable'
  'GeneralPurpose'
  'MemoryOptimized'
])
param skuTier string = 'Burstable'

@description('Storage size in GiB.')
param storageSizeGB int = 32

@description('High availability mode; not available on the Burstable tier.')
@allowed([
  'Disabled'
  'SameZone'
  'ZoneRedundant'
])
param highAvailability string = 'Disabled'

@description('Geo-redundant backups (can only be chosen when the server is created).')
@allowed([
  'Enabled'
  'Disabled'
])
param geoRedundantBackup string = 'Disabled'

@description('Days of point-in-time-restore backups.')
@minValue(7)
@maxValue(35)
param backupRetentionDays int = 7

@description('Public network access to the server: Enabled (firewall rules below) or Disabled (private access only).')
@allowed([
  'Enabled'
  'Disabled'
])
param publicNetworkAccess string = 'Enabled'

@description('Add the 0.0.0.0 rule that admits connections from Azure services (Flex Consumption has no fixed outbound IPs without VNet integration).')
param allowAzureServices bool = true

@description('Extra firewall rules: [{ name, startIpAddress, endIpAddress }], e.g. an operator\'s address for psql.')
param allowedIpRanges array = []

@description('Microsoft Entra tenant of the principals.')
param tenantId string = subscription().tenantId

@description('Entra principals to register: [{ objectId, name, type }] (type ServicePrincipal, User or Group).')
param entraAdministrators array

resource server 'Microsoft.DBforPostgreSQL/flexibleServers@2024-08-01' = {
  name: serverName
  location: location
  tags: tags
  sku: {
    name: skuName
    tier: skuTier
  }
  properties: {
    version: version
    createMode: 'Default'
    authConfig: {
      activeDirectoryAuth: 'Enabled'
      passwordAuth: 'Disabled'
      tenantId: tenantId
    }
    storage: {
      storageSizeGB: storageSizeGB
      autoGrow: 'Enabled'
    }
    backup: {
      backupRetentionDays: backupRetentionDays
      geoRedundantBackup: geoRedundantBackup
    }
    highAvailability: {
      mode: highAvailability
    }
    network: {
      publicNetworkAccess: publicNetworkAccess
    }
  }
}

resource database 'Microsoft.DBforPostgreSQL/flexibleServers/databases@2024-08-01' = {
  parent: server
  name: databaseName
  properties: {
    charset: 'UTF8'
    collation: 'en_US.utf8'
  }
}

resource allowAzure 'Microsoft.DBforPostgreSQL/flexibleServers/firewallRules@2024-08-01' = if (publicNetworkAccess == 'Enabled' && allowAzureServices) {
  parent: server
  name: 'AllowAllAzureServicesAndResourcesWithinAzureIps'
  properties: {
    startIpAddress: '0.0.0.0'
    endIpAddress: '0.0.0.0'
  }
}

@batchSize(1)
resource extraRules 'Microsoft.DBforPostgreSQL/flexibleServers/firewallRules@2024-08-01' = [for rule in allowedIpRanges: if (publicNetworkAccess == 'Enabled') {
  parent: server
  name: rule.name
  properties: {
    startIpAddress: rule.startIpAddress
    endIpAddress: rule.endIpAddress
  }
}]

// The server accepts one administrator operation at a time, hence batchSize(1).
@batchSize(1)
resource administrators 'Microsoft.DBforPostgreSQL/flexibleServers/administrators@2024-08-01' = [for principal in entraAdministrators: {
  parent: server
  name: principal.objectId
  properties: {
    principalName: principal.name
    principalType: principal.type
    tenantId: tenantId
  }
  dependsOn: [
    database
    extraRules
  ]
}]

output serverName string = server.name
output fqdn string = server.properties.fullyQualifiedDomainName
output databaseName string = database.name
