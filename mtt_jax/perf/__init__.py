"""Performance tooling: model FLOPs and MFU, profiles and op-time tables, huge pages."""
