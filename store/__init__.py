"""Persistence behind one interface: SQLite (default), Supabase, the mirrored pair of both,
the SQLite → Supabase migration, and the Supabase schema file."""
