"""The failure alert: a Prefect automation that posts to a webhook when a deployment run fails or crashes.

Scheduled and on-demand deployment runs (``prefect.yaml``) are the ones nobody watches; when one ends
Failed or Crashed, the server's automation sends a notification through a custom-webhook block: a JSON
POST with the flow, the run, its final state and message and a link to it in the UI (Slack, Teams,
PagerDuty or any receiver of JSON webhooks). ``attnrl alerts --webhook URL`` creates both, or updates
them in place, so running it again (``make server`` does with ``ATTNRL_ALERT_WEBHOOK`` set) is safe.
Runs started from the command line are watched by the person who started them and do not alert.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import UUID

import yaml
from prefect import get_client
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

AUTOMATION_NAME = "attnrl: deployment run failed"
BLOCK_NAME = "attnrl-failure-webhook"
FAILURE_EVENTS = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
SUBJECT = "attnrl: {{ flow.name }} run {{ flow_run.name }} is {{ flow_run.state.name }}"
BODY = ("Deployment {{ deployment.name }}: flow run {{ flow_run.name }} ({{ flow_run.id }}) of flow {{ flow.name }} "
        "ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n{{ flow_run|ui_url }}")


def deployment_names(prefect_yaml: Path) -> list[str]:
    """The deployments ``prefect.yaml`` registers: the runs whose failures alert."""
    return [d["name"] for d in yaml.safe_load(prefect_yaml.read_text())["deployments"]]


def failure_trigger(deployments: list[str]) -> EventTrigger:
    return EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "deployment", "prefect.resource.name": deployments},
        expect=FAILURE_EVENTS,
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )


def _save_webhook(url: str) -> UUID:
    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME, url=url, method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "attnrl"},
    )
    return block.save(BLOCK_NAME, overwrite=True)


def ensure_failure_alert(webhook_url: str, deployments: list[str]) -> UUID:
    """Create or update the webhook block and the automation; returns the automation's id."""
    block_id = _save_webhook(webhook_url)
    automation = AutomationCore(
        name=AUTOMATION_NAME,
        description="Notify the team's webhook when a scheduled or on-demand attnrl run fails or crashes.",
        trigger=failure_trigger(deployments),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    )
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if existing:
            client.update_automation(existing[0].id, automation)
            return existing[0].id
        return client.create_automation(automation)
