"""Small helpers shared by the core: atomic writes and seeding."""
