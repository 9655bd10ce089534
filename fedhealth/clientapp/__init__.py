"""The site's ClientApp: handlers, secure-aggregation stages, site events, egress log."""
