"""Local development tools that never deploy: Service Bus emulator, Functions host, stack runner, demo."""
