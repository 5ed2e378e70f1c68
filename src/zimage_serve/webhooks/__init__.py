"""Webhooks: endpoints an admin registers, signed deliveries of job events (Standard Webhooks), from an
outbox the queue writes in the same transaction as each job's change."""
