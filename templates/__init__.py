"""Jinja templates of puzzle-gen (installed as the package ``generator.templates``)."""
