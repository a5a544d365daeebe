"""The emulated hardware both halves share: guest memory, doorbells, the SynIC message port."""
