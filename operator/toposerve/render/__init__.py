"""The renderer: plan + spec -> Kubernetes objects (pure), from jinja2 templates."""
