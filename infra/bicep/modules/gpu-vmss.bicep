// GPU workers: a VM Scale Set of NC-series VMs (Spot by default) that runs the Dockerfile.gpu image with the NVIDIA
// container runtime (cloud-init in gpu-worker.cloud-init.yaml). It starts with no instances; autoscale
// (modules/autoscale.bicep) follows the active message counts of the two jobs queues. Scale-in and Spot evictions are
// announced through Scheduled Events (Terminate notification enabled here, Preempt always), which the worker turns into
// its graceful drain (gpu_worker/preemption.py).

@description('Azure region of the scale set (must offer the GPU SKU).')
param location string

@description('Tags applied to every resource.')
param tags object

@description('Name of the scale set.')
param vmssName string

@description('NC-series VM size, e.g. Standard_NC4as_T4_v3 (T4), Standard_NC24ads_A100_v4 (A100).')
param vmSku string = 'Standard_NC4as_T4_v3'

@description('Run on Spot capacity (much cheaper, can be evicted with 30 s notice).')
param useSpot bool = true

@description('What happens to an evicted Spot VM: Delete (no cost afterwards) or Deallocate (disk kept and billed).')
@allowed([
  'Delete'
  'Deallocate'
])
param spotEvictionPolicy string = 'Delete'

@description('Highest hourly price in USD for a Spot VM; -1 means up to the pay-as-you-go price (evicted for capacity only).')
param spotMaxPrice int = -1

@description('Instances when the scale set is created; autoscale takes over afterwards.')
@minValue(0)
param initialInstanceCount int = 0

@description('Minutes a VM being deleted by scale-in waits for the worker to drain and acknowledge (5-15).')
@minValue(5)
@maxValue(15)
param terminateNotificationMinutes int = 5

@description('Linux image of the VMs.')
param imageReference object = {
  publisher: 'Canonical'
  offer: '0001-com-ubuntu-server-jammy'
  sku: '22_04-lts-gen2'
  version: 'latest'
}

@description('OS disk type.')
@allowed([
  'Standard_LRS'
  'StandardSSD_LRS'
  'Premium_LRS'
])
param osDiskType string = 'StandardSSD_LRS'

@description('OS disk size in GiB (the CUDA PyTorch image is large).')
@minValue(64)
param osDiskSizeGB int = 128

@description('Encrypt temp disks and caches at the host (needs the EncryptionAtHost feature on the subscription).')
param encryptionAtHost bool = false

@description('Administrator user name (SSH key only; no inbound port is open, use Bastion or run-command).')
param adminUsername string = 'azureuser'

@description('SSH public key of the administrator.')
param sshPublicKey string

@description('Resource id of the workers\' subnet.')
param subnetId string

@description('Resource id of the workers\' user-assigned identity.')
param identityId string

@description('Client id of the workers\' identity (AZURE_CLIENT_ID, ACR login).')
param identityClientId string

@description('Name of the workers\' identity, which is also its PostgreSQL role name (POSTGRES_USER).')
param identityName string

@description('ACR login server, <name>.azurecr.io.')
param registryLoginServer string

@description('Worker image repository and tag inside the registry.')
param workerImage string = 'crop-ai-worker:latest'

@description('Blob endpoint of the storage account.')
param blobEndpoint string

@description('Container of uploaded images.')
param imagesContainerName string

@description('Container of results.')
param resultsContainerName string

@description('Fully qualified Service Bus namespace.')
param serviceBusNamespaceFqdn string

@description('Name of the normal-priority jobs queue (JOBS_QUEUE_NAME).')
param queueName string

@description('Name of the high-priority jobs queue (JOBS_HIGH_QUEUE_NAME).')
param highPriorityQueueName string

@description('Name of the webhook delivery events queue the worker sends to (JOB_EVENTS_QUEUE_NAME).')
param eventsQueueName string

@description('Host name of the PostgreSQL server.')
param postgresHost string

@description('Name of the application database.')
param postgresDatabase string

@description('Application Insights connection string.')
param appInsightsConnectionString string

@description('OTEL_SERVICE_NAME of the workers: the service namespace of their telemetry (cloud_RoleName <name>.gpu-worker).')
param serviceName string = 'crop-ai'

@description('Attempts a job gets (JOB_MAX_ATTEMPTS): the worker fails the last one for good; main.bicep passes the reconciler the same parameter.')
@minValue(1)
param jobMaxAttempts int

@description('Lease of a running attempt, renewed every third of it (JOB_LEASE, ISO 8601); shorter than jobTimeout.')
param jobLease string

@description('Time limit of one attempt (JOB_TIMEOUT, ISO 8601); message locks are renewed for it plus the grace and the lease.')
param jobTimeout string

@description('Backoff before the next attempt after a transient error, doubled per attempt (RETRY_BACKOFF, ISO 8601).')
param retryBackoff string

@description('Longest backoff between two attempts (RETRY_BACKOFF_MAX, ISO 8601).')
param retryBackoffMax string

@description('High-priority jobs a worker takes in a row before it takes one normal job if one waits (WORKER_HIGH_PRIORITY_BURST).')
@minValue(1)
param highPriorityBurst int

@description('Hosts an image_url may name outside the storage account (IMAGE_URL_ALLOWED_HOSTS): checked again before a read.')
param imageUrlAllowedHosts string

@description('Seconds between two heartbeat rows a worker writes to PostgreSQL (WORKER_REGISTRY_INTERVAL).')
@minValue(1)
param registryIntervalSeconds int = 15

@description('Seconds the worker gets to finish in-flight work after SIGTERM or a Preempt notice; keep under 30 for Spot.')
@minValue(1)
param shutdownGraceSeconds int = 25

@description('Local port of the health endpoint probed by the Application Health extension.')
param healthPort int = 8080

var image = '${registryLoginServer}/${workerImage}'
var stopTimeoutSeconds = shutdownGraceSeconds + 30

// The worker container's environment: names are shared/settings.py Settings aliases (tests/infra checks it). The
// worker receives one message at a time (gpu_worker/consumer.py), from jobs-high first (at most
// WORKER_HIGH_PRIORITY_BURST in a row while normal jobs wait): there is no batch size to set.
var workerEnvironment = {
  ServiceBusConnection__fullyQualifiedNamespace: serviceBusNamespaceFqdn
  JOBS_QUEUE_NAME: queueName
  JOBS_HIGH_QUEUE_NAME: highPriorityQueueName
  JOB_EVENTS_QUEUE_NAME: eventsQueueName
  AzureWebJobsStorage__blobServiceUri: blobEndpoint
  IMAGES_CONTAINER: imagesContainerName
  RESULTS_CONTAINER: resultsContainerName
  POSTGRES_HOST: postgresHost
  POSTGRES_DATABASE: postgresDatabase
  POSTGRES_USER: identityName
  AZURE_CLIENT_ID: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  OTEL_SERVICE_NAME: serviceName
  WORKER_DEVICE: 'cuda'
  WORKER_SHUTDOWN_GRACE: string(shutdownGraceSeconds)
  WORKER_PREEMPTION_WATCH: 'true'
  WORKER_HIGH_PRIORITY_BURST: string(highPriorityBurst)
  IMAGE_URL_ALLOWED_HOSTS: imageUrlAllowedHosts
  WORKER_REGISTRY_INTERVAL: string(registryIntervalSeconds)
  JOB_MAX_ATTEMPTS: string(jobMaxAttempts)
  JOB_LEASE: jobLease
  JOB_TIMEOUT: jobTimeout
  RETRY_BACKOFF: retryBackoff
  RETRY_BACKOFF_MAX: retryBackoffMax
}

var cloudInitTemplate = loadTextContent('gpu-worker.cloud-init.yaml')
var cloudInitWithEnv = replace(cloudInitTemplate, '__WORKER_ENV_B64__', base64(string(workerEnvironment)))
var cloudInitWithRegistry = replace(cloudInitWithEnv, '__REGISTRY__', registryLoginServer)
var cloudInitWithClient = replace(cloudInitWithRegistry, '__CLIENT_ID__', identityClientId)
var cloudInitWithImage = replace(cloudInitWithClient, '__IMAGE__', image)
var cloudInitWithTimeout = replace(cloudInitWithImage, '__STOP_TIMEOUT__', string(stopTimeoutSeconds))
var cloudInit = replace(cloudInitWithTimeout, '__HEALTH_PORT__', string(healthPort))

resource vmss 'Microsoft.Compute/virtualMachineScaleSets@2024-07-01' = {
  // checkov:skip=CKV_AZURE_97:Encryption at host is the encryptionAtHost parameter; it needs a per-subscription feature registration, so it is off by default
  name: vmssName
  location: location
  tags: tags
  sku: {
    name: vmSku
    tier: 'Standard'
    capacity: initialInstanceCount
  }
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    orchestrationMode: 'Uniform'
    overprovision: false
    singlePlacementGroup: false
    upgradePolicy: {
      mode: 'Manual'
    }
    scaleInPolicy: {
      rules: [
        'Default'
      ]
    }
    virtualMachineProfile: {
      priority: useSpot ? 'Spot' : 'Regular'
      evictionPolicy: useSpot ? spotEvictionPolicy : null
      billingProfile: useSpot ? {
        maxPrice: spotMaxPrice
      } : null
      scheduledEventsProfile: {
        terminateNotificationProfile: {
          enable: true
          notBeforeTimeout: 'PT${terminateNotificationMinutes}M'
        }
      }
      osProfile: {
        computerNamePrefix: 'gpuworker'
        adminUsername: adminUsername
        customData: base64(cloudInit)
        linuxConfiguration: {
          disablePasswordAuthentication: true
          provisionVMAgent: true
          ssh: {
            publicKeys: [
              {
                path: '/home/${adminUsername}/.ssh/authorized_keys'
                keyData: sshPublicKey
              }
            ]
          }
        }
      }
      storageProfile: {
        imageReference: imageReference
        osDisk: {
          createOption: 'FromImage'
          caching: 'ReadWrite'
          diskSizeGB: osDiskSizeGB
          managedDisk: {
            storageAccountType: osDiskType
          }
        }
      }
      securityProfile: {
        encryptionAtHost: encryptionAtHost
      }
      diagnosticsProfile: {
        bootDiagnostics: {
          enabled: true
        }
      }
      networkProfile: {
        networkInterfaceConfigurations: [
          {
            name: 'nic'
            properties: {
              primary: true
              ipConfigurations: [
                {
                  name: 'ipconfig'
                  properties: {
                    primary: true
                    subnet: {
                      id: subnetId
                    }
                  }
                }
              ]
            }
          }
        ]
      }
      extensionProfile: {
        extensions: [
          {
            name: 'NvidiaGpuDriverLinux'
            properties: {
              publisher: 'Microsoft.HpcCompute'
              type: 'NvidiaGpuDriverLinux'
              typeHandlerVersion: '1.6'
              autoUpgradeMinorVersion: true
              settings: {}
            }
          }
          {
            name: 'HealthExtension'
            properties: {
              publisher: 'Microsoft.ManagedServices'
              type: 'ApplicationHealthLinux'
              typeHandlerVersion: '2.0'
              autoUpgradeMinorVersion: true
              enableAutomaticUpgrade: true
              provisionAfterExtensions: [
                'NvidiaGpuDriverLinux'
              ]
              settings: {
                protocol: 'http'
                port: healthPort
                requestPath: '/health'
                intervalInSeconds: 30
                numberOfProbes: 3
                gracePeriod: 1800
              }
            }
          }
        ]
      }
    }
  }
}

output vmssName string = vmss.name
output vmssId string = vmss.id
