"""Pure wire formats and constants: no I/O, no state beyond the bytes handed in."""
