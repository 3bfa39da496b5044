"""Data: the canonical dataset format, the sources and readers, splits and the download stage."""
