"""The coordinator's side: SuperLink service, site enrolment, run launcher."""
