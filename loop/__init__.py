"""The main loop: one cycle of SPEC section 0 (``cycle``), the runner that paces it, the status
payload built from its parts, and the check of a restored snapshot."""
