/*
 * iscsi-pr: persistent reservations over libiscsi, for the tests (libiscsi-bin
 * has no PR tool). One command per run:
 *
 *   iscsi-pr URL register KEY [aptpl]   REGISTER AND IGNORE EXISTING KEY
 *   iscsi-pr URL reserve KEY TYPE [aptpl]  REGISTER KEY, then RESERVE (TYPE 1..8),
 *                                       in one session
 *   iscsi-pr URL keys                   READ KEYS: "generation G" then a key per line
 *   iscsi-pr URL reservation            READ RESERVATION: "KEY TYPE" or "none"
 *   iscsi-pr URL caps                   REPORT CAPABILITIES: "ptpl_c=N"
 *
 * Keys are hexadecimal. A command the target refuses prints
 * "status S sense K/ASCQ" (ASCQ as ASC<<8|ASCQ, hexadecimal) and exits 2.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

static int refused(struct scsi_task *t)
{
	printf("status %d sense %x/%04x\n", t->status, t->sense.key, t->sense.ascq);
	scsi_free_scsi_task(t);
	return 2;
}

/* Sends PERSISTENT RESERVE OUT; exits on a transport error. */
static struct scsi_task *pr_out(struct iscsi_context *iscsi, int lun, int sa,
				int type, struct scsi_persistent_reserve_out_basic *p)
{
	struct scsi_task *t = iscsi_persistent_reserve_out_sync(iscsi, lun, sa,
		SCSI_PERSISTENT_RESERVE_SCOPE_LU, type, p);
	if (t == NULL) {
		fprintf(stderr, "PERSISTENT RESERVE OUT: %s\n", iscsi_get_error(iscsi));
		exit(1);
	}
	return t;
}

/* Sends PERSISTENT RESERVE IN; its parsed answer, or NULL with *t refused. */
static void *pr_in(struct iscsi_context *iscsi, int lun, int sa, struct scsi_task **t)
{
	*t = iscsi_persistent_reserve_in_sync(iscsi, lun, sa, 16384);
	if (*t == NULL) {
		fprintf(stderr, "PERSISTENT RESERVE IN: %s\n", iscsi_get_error(iscsi));
		exit(1);
	}
	if ((*t)->status != SCSI_STATUS_GOOD)
		return NULL;
	void *d = scsi_datain_unmarshall(*t);
	if (d == NULL) {
		fprintf(stderr, "PERSISTENT RESERVE IN: cannot parse the answer\n");
		exit(1);
	}
	return d;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: iscsi-pr URL register|reserve|keys|reservation|caps ...\n");
		return 1;
	}
	struct iscsi_context *iscsi = iscsi_create_context("iqn.2026-12.org.strata:pr-client");
	struct iscsi_url *url = iscsi_parse_full_url(iscsi, argv[1]);
	if (url == NULL) {
		fprintf(stderr, "bad url: %s\n", iscsi_get_error(iscsi));
		return 1;
	}
	iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
	if (iscsi_full_connect_sync(iscsi, url->portal, url->lun) != 0) {
		fprintf(stderr, "login: %s\n", iscsi_get_error(iscsi));
		return 1;
	}
	int lun = url->lun;
	const char *cmd = argv[2];
	struct scsi_task *t;
	struct scsi_persistent_reserve_out_basic p = { 0 };
	if (!strcmp(cmd, "register") && argc >= 4) {
		p.service_action_reservation_key = strtoull(argv[3], NULL, 16);
		p.aptpl = argc >= 5 && !strcmp(argv[4], "aptpl");
		t = pr_out(iscsi, lun, SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY, 0, &p);
		if (t->status != SCSI_STATUS_GOOD)
			return refused(t);
		printf("ok\n");
	} else if (!strcmp(cmd, "reserve") && argc >= 5) {
		p.service_action_reservation_key = strtoull(argv[3], NULL, 16);
		p.aptpl = argc >= 6 && !strcmp(argv[5], "aptpl");
		t = pr_out(iscsi, lun, SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY, 0, &p);
		if (t->status != SCSI_STATUS_GOOD)
			return refused(t);
		scsi_free_scsi_task(t);
		memset(&p, 0, sizeof(p));
		p.reservation_key = strtoull(argv[3], NULL, 16);
		t = pr_out(iscsi, lun, SCSI_PERSISTENT_RESERVE_RESERVE, atoi(argv[4]), &p);
		if (t->status != SCSI_STATUS_GOOD)
			return refused(t);
		printf("ok\n");
	} else if (!strcmp(cmd, "keys")) {
		struct scsi_persistent_reserve_in_read_keys *k =
			pr_in(iscsi, lun, SCSI_PERSISTENT_RESERVE_READ_KEYS, &t);
		if (k == NULL)
			return refused(t);
		printf("generation %u\n", k->prgeneration);
		for (int i = 0; i < k->num_keys; i++)
			printf("%" PRIx64 "\n", k->keys[i]);
	} else if (!strcmp(cmd, "reservation")) {
		struct scsi_persistent_reserve_in_read_reservation *r =
			pr_in(iscsi, lun, SCSI_PERSISTENT_RESERVE_READ_RESERVATION, &t);
		if (r == NULL)
			return refused(t);
		if (r->reserved)
			printf("%" PRIx64 " %d\n", r->reservation_key, r->pr_type);
		else
			printf("none\n");
	} else if (!strcmp(cmd, "caps")) {
		struct scsi_persistent_reserve_in_report_capabilities *c =
			pr_in(iscsi, lun, SCSI_PERSISTENT_RESERVE_REPORT_CAPABILITIES, &t);
		if (c == NULL)
			return refused(t);
		/* libiscsi 1.19 does not parse PTPL_A. */
		printf("ptpl_c=%d\n", c->ptpl_c);
	} else {
		fprintf(stderr, "unknown command %s\n", cmd);
		return 1;
	}
	scsi_free_scsi_task(t);
	iscsi_logout_sync(iscsi);
	iscsi_destroy_context(iscsi);
	return 0;
}
