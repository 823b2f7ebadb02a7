"""The local stack without Docker: Kafka, Apicurio Registry and MinIO as plain processes.

    from infra.stack import up, down, status, logs
    statuses = up(settings.stack, settings.storage)

Programs are installed once per machine into StackSettings.cache_dir (Maven for the JVM
services, `go install` for MinIO); logs, data and pid files live in StackSettings.state_dir.
Services run detached and outlive the command that started them. Topics and buckets are not
made here (infra/provision.py does that).
"""

from infra.stack.lifecycle import ServiceState, ServiceStatus, down, logs, service_names, status, up

__all__ = ["ServiceState", "ServiceStatus", "down", "logs", "service_names", "status", "up"]
