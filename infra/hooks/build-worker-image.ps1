# azd predeploy hook (azure.yaml), Windows: the same as build-worker-image.sh. Builds Dockerfile.gpu in the registry
# (az acr build, no local Docker) and pushes it as WORKER_IMAGE, the image the GPU workers run. Reads the azd
# environment (main.bicep's outputs): AZURE_SUBSCRIPTION_ID, AZURE_CONTAINER_REGISTRY_NAME, WORKER_IMAGE;
# WORKER_IMAGE_BUILD=false skips the build. Needs `az login` as well as azd's login.
$ErrorActionPreference = 'Stop'
Set-Location (Join-Path $PSScriptRoot '../..')

if ($env:WORKER_IMAGE_BUILD -eq 'false') {
    Write-Host 'WORKER_IMAGE_BUILD=false: the worker image is not rebuilt.'
    exit 0
}
foreach ($name in 'AZURE_SUBSCRIPTION_ID', 'AZURE_CONTAINER_REGISTRY_NAME', 'WORKER_IMAGE') {
    if (-not [Environment]::GetEnvironmentVariable($name)) {
        throw "$name is not set: run azd provision first (a main.bicep output)"
    }
}

Write-Host "Building $env:WORKER_IMAGE from Dockerfile.gpu in registry $env:AZURE_CONTAINER_REGISTRY_NAME (several minutes)."
az acr build --subscription $env:AZURE_SUBSCRIPTION_ID --registry $env:AZURE_CONTAINER_REGISTRY_NAME `
    --image $env:WORKER_IMAGE --file Dockerfile.gpu .
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
Write-Host "Pushed $env:WORKER_IMAGE`: worker VMs pull it whenever their worker service starts (docs/deploy.md)."
