"""The host side of PCI: the configuration space every function has, MSI-X, and the host
bridge."""
