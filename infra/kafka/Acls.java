// The Kafka ACLs of one deployment: what each service's user may do, and nothing more.
//
// Run by infra/scripts/kafka-acls.sh (java's single-file source launcher, with the broker's
// jars on the class path):
//
//   Acls <bootstrap> <admin client properties file> <topic prefix> <gateway id>[,<gateway id>...]
//
// Users (principals User:<name>):
//   gateway-<id>  writes inbound and presence, reads presence (it closes the sessions a user
//                 opened elsewhere), reads its own outbound-<id> in its group <prefix>gateway-<id>;
//                 nothing of another gateway's;
//   multiplexer   reads inbound in its group <prefix>multiplexer and presence, writes every
//                 outbound-<id> (a prefixed ACL: gateways added later included) and inbound-dlq;
//   data          reads every topic of the deployment (a prefixed ACL), in groups <prefix>data-*;
//                 writes nothing.
// The admin user is a super user of the broker and holds no ACL here. Creating the ACLs again
// is harmless (an ACL that exists is left as it is); it prints each one.

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class Acls {
    private final List<AclBinding> acls = new ArrayList<>();

    private void allow(String user, ResourceType type, String name, PatternType pattern, AclOperation... ops) {
        for (AclOperation op : ops) {
            acls.add(new AclBinding(
                new ResourcePattern(type, name, pattern),
                new AccessControlEntry("User:" + user, "*", op, AclPermissionType.ALLOW)));
        }
    }

    private void topic(String user, String name, AclOperation... ops) {
        allow(user, ResourceType.TOPIC, name, PatternType.LITERAL, ops);
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: Acls <bootstrap> <admin properties> <topic prefix> <gateway ids, comma separated>");
            System.exit(2);
        }
        String bootstrap = args[0], prefix = args[2];
        Properties props = new Properties();
        try (var in = Files.newInputStream(Path.of(args[1]))) {
            props.load(in);
        }
        props.put("bootstrap.servers", bootstrap);

        Acls a = new Acls();
        AclOperation READ = AclOperation.READ, WRITE = AclOperation.WRITE, DESCRIBE = AclOperation.DESCRIBE;
        for (String id : args[3].split(",")) {
            if (id.isBlank()) continue;
            String user = "gateway-" + id.trim();
            a.topic(user, prefix + "inbound", WRITE, DESCRIBE);
            a.topic(user, prefix + "presence", WRITE, READ, DESCRIBE);
            a.topic(user, prefix + "outbound-" + id.trim(), READ, DESCRIBE);
            a.allow(user, ResourceType.GROUP, prefix + "gateway-" + id.trim(), PatternType.LITERAL, READ);
        }
        a.topic("multiplexer", prefix + "inbound", READ, DESCRIBE);
        a.topic("multiplexer", prefix + "presence", READ, DESCRIBE);
        a.topic("multiplexer", prefix + "inbound-dlq", WRITE, DESCRIBE);
        a.allow("multiplexer", ResourceType.TOPIC, prefix + "outbound-", PatternType.PREFIXED, WRITE, DESCRIBE);
        a.allow("multiplexer", ResourceType.GROUP, prefix + "multiplexer", PatternType.LITERAL, READ);
        // An empty prefix makes these the whole cluster's topics: the data team then reads
        // everything on it, which is what a cluster of one deployment means.
        a.allow("data", ResourceType.TOPIC, prefix.isEmpty() ? "*" : prefix,
            prefix.isEmpty() ? PatternType.LITERAL : PatternType.PREFIXED, READ, DESCRIBE);
        a.allow("data", ResourceType.GROUP, prefix + "data-", PatternType.PREFIXED, READ);

        try (Admin admin = Admin.create(props)) {
            admin.createAcls(a.acls).all().get();
        }
        for (AclBinding b : a.acls) {
            System.out.println(b.entry().principal() + " " + b.entry().operation() + " "
                + b.pattern().resourceType() + " " + b.pattern().patternType() + " " + b.pattern().name());
        }
    }
}
