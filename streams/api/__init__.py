"""The HTTP API, the page (static/) and the OpenAPI document."""
