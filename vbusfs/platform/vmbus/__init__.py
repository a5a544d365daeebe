"""What a Hyper-V guest gets from the hypervisor: SynIC messages and events, ring endpoints."""
