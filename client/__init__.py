"""Site side: the site daemon (SuperNode + warm worker) and the per-message ClientApp."""
