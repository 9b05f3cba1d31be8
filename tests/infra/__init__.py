"""The deployment files: docker-compose.yml and infra/."""
