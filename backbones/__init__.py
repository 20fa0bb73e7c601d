"""timm model families built from vzoo modules (registered on import of :mod:`vzoo`)."""
