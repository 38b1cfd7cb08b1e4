"""Work-arounds for the environments vaeft runs in (one module per quirk)."""
