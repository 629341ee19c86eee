"""The ops dashboard: server-rendered Jinja2 pages with HTMX under /dashboard."""
