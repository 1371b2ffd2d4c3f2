"""ORBION lead service: lead state, qualification, bot detection, opt-out and the lead API."""
