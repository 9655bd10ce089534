"""Reports for people: privacy budget reports (HTML with plots, JSON, Markdown)."""
