"""The application layer shared by the CLI and jobs/: options, pre-flight checks, stages, logging."""
