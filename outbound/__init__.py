"""The outbound room: the durable queue of relays to professionals and notifications to
patients (worker, relay over STARTTLS, DKIM, bounces)."""
