"""Prefect flows and deployments that run the library, and the `tera` command line (flows/cli)."""
