"""Reports: everything here reads run folders' records, never the engine."""
