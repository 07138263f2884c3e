"""Where and how the system starts: joining or starting Ray and each role's resources and actor
environment (`cluster`, which imports only the config and Ray, so roles may use its actor options),
and starting and stopping the roles' actors with those resources after a capacity check (`launch`,
which imports `roles/`). `launch/` never imports `run/`; the driver calls it."""
