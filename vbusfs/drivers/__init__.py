"""Guest-side bus drivers: they find devices only through bus protocols and publish them."""
