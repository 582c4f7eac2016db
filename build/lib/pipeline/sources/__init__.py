"""Where commits come from: git mirrors and ref checks (`git`, `refs`, the only GitPython
users), webhook signatures and payloads (`webhooks/`), the schedules that poll and rebuild
(`schedule`, APScheduler) and file watching (`watch`, watchdog). Turns the outside world into
revisions and push events; may import `config/` and `plan/` types, never `deploy/` or above."""
