"""Everything that talks to, or models, Cloudflare's API."""
