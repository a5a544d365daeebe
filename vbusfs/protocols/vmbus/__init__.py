"""VMBus wire formats: channel messages, the ring buffer and IC messages (pure, no I/O)."""
