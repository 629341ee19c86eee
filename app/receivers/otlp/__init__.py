"""OpenTelemetry OTLP/HTTP trace receiver (`/otlp/v1/traces`, `/api/public/otel/v1/traces`)."""
