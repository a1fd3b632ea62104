// The operators' Azure Monitor workbook "Crop AI operations": backlog and dead letters (Service Bus platform
// metrics), throughput, jobs in flight, p50/p95 run duration and queue wait, stage durations, failures by code,
// workers alive, GPU utilisation and memory, and the slowest jobs with a link to their end-to-end trace.
// The panels live in workbook.json (Notebook/1.0, readable and parsed by tests/unit/test_metrics.py, which checks
// that every metric, dimension and span attribute its queries name is emitted by the code); the two resource ids
// are placeholders replaced here. docs/monitoring.md describes each panel and the data behind it.

@description('Azure region of the workbook.')
param location string

@description('Tags applied to every resource.')
param tags object

@description('Display name of the workbook in the Portal (Monitor > Workbooks, and the Application Insights resource).')
param displayName string = 'Crop AI operations'

@description('Resource id of the Application Insights component (the workbook\'s source; its KQL queries run there).')
param appInsightsId string

@description('Resource id of the Service Bus namespace (backlog and dead-letter panels).')
param serviceBusNamespaceId string

var template = loadTextContent('workbook.json')
var withAppInsights = replace(template, '__APP_INSIGHTS_ID__', appInsightsId)
var serializedData = replace(withAppInsights, '__SERVICE_BUS_ID__', serviceBusNamespaceId)

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  // A workbook's name must be a GUID: stable per resource group and display name, so a redeployment updates it.
  name: guid(resourceGroup().id, 'crop-ai-workbook', displayName)
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: displayName
    category: 'workbook'
    version: 'Notebook/1.0'
    sourceId: appInsightsId
    serializedData: serializedData
  }
}

output workbookId string = workbook.id
