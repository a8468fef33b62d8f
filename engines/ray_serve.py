"""Ray Serve entry point, kept importable under its documented name (`serve run engines.ray_serve:app_builder`);
the code is engines.serving.ray."""

from .serving.ray import APP_NAME, INGRESS, RayOptions, app_builder, build_app, serve_on_ray  # noqa: F401

__all__ = ["APP_NAME", "INGRESS", "RayOptions", "app_builder", "build_app", "serve_on_ray"]
