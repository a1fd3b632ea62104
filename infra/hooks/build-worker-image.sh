#!/bin/sh
# azd predeploy hook (azure.yaml): build Dockerfile.gpu in the registry and push it as the image the GPU workers run.
# No local Docker: ACR Tasks builds from the repository (.dockerignore sends only what the worker needs). Reads the
# azd environment, which `azd provision` fills from main.bicep's outputs: AZURE_SUBSCRIPTION_ID,
# AZURE_CONTAINER_REGISTRY_NAME, WORKER_IMAGE (repository:tag). WORKER_IMAGE_BUILD=false skips the build, e.g.
# while iterating on the API alone (`azd env set WORKER_IMAGE_BUILD false`). Needs `az login` as well as azd's login.
set -eu
cd "$(dirname "$0")/../.."

if [ "${WORKER_IMAGE_BUILD:-true}" = "false" ]; then
    echo "WORKER_IMAGE_BUILD=false: the worker image is not rebuilt."
    exit 0
fi
: "${AZURE_SUBSCRIPTION_ID:?is not set: run azd provision first}"
: "${AZURE_CONTAINER_REGISTRY_NAME:?is not set: run azd provision first (a main.bicep output)}"
: "${WORKER_IMAGE:?is not set: run azd provision first (a main.bicep output)}"

echo "Building ${WORKER_IMAGE} from Dockerfile.gpu in registry ${AZURE_CONTAINER_REGISTRY_NAME} (several minutes)."
az acr build --subscription "$AZURE_SUBSCRIPTION_ID" --registry "$AZURE_CONTAINER_REGISTRY_NAME" \
    --image "$WORKER_IMAGE" --file Dockerfile.gpu .
echo "Pushed ${WORKER_IMAGE}: worker VMs pull it whenever their worker service starts (docs/deploy.md)."
